//! The state writer: one thread owns the [`StateDir`] and performs every write, each with its
//! fsyncs, in the order they are asked for. Callers await the answer, so the ordering rules hold
//! (a generation is persisted before it is used, a report before it is offered), but a slow disk
//! only delays whoever waits for the write — never the async threads that drain the BPF ring
//! buffer and run detection.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
};

use guestwatch_protocol::Report;
use tokio::sync::oneshot;

use super::{
    resume::{self, Resumed},
    state::{Acked, Rejected, StateDir, StateError},
    stored,
};

type Job = Box<dyn FnOnce(&mut StateDir) + Send>;

/// A handle on the writer thread (cheap to clone).
#[derive(Clone)]
pub struct StateWriter {
    jobs: mpsc::Sender<Job>,
    dir: PathBuf,
    epoch: u64,
    /// The last write's failure, if it failed (for `/healthz`).
    failure: Arc<Mutex<Option<String>>>,
}

impl StateWriter {
    /// Moves `state` to a new writer thread. The thread ends when every handle is dropped.
    pub fn start(state: StateDir) -> Result<Self, StateError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let dir = state.dir().to_path_buf();
        let epoch = state.epoch();
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                let mut state = state;
                while let Ok(job) = queue.recv() {
                    job(&mut state);
                }
            })
            .map_err(|source| StateError::Io {
                path: dir.clone(),
                source,
            })?;
        Ok(Self {
            jobs,
            dir,
            epoch,
            failure: Arc::new(Mutex::new(None)),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Runs `job` on the writer thread and waits for its result.
    async fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut StateDir) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let (answer, answered) = oneshot::channel();
        let failure = self.failure.clone();
        let job: Job = Box::new(move |state| {
            let result = job(state);
            let mut last = failure.lock().unwrap_or_else(|p| p.into_inner());
            *last = result.as_ref().err().map(ToString::to_string);
            let _ = answer.send(result);
        });
        self.jobs.send(job).map_err(|_| StateError::WriterGone)?;
        answered.await.map_err(|_| StateError::WriterGone)?
    }

    /// What the previous run left: see [`resume::resume`].
    pub async fn resume(&self) -> Result<Resumed, StateError> {
        self.call(|state| Ok(resume::resume(state))).await
    }

    /// Issues the next generation, persisted before it is returned.
    pub async fn next_generation(&self) -> Result<u64, StateError> {
        self.call(StateDir::next_generation).await
    }

    /// Persists `report` as the pending one (encoded on the writer thread too).
    pub async fn save_pending(&self, report: Arc<Report>) -> Result<(), StateError> {
        self.call(move |state| match stored::encode(&report) {
            Some(bytes) => state.save_pending(&bytes),
            None => {
                log::error!("report {} cannot be encoded for persistence", report.id);
                Ok(())
            }
        })
        .await
    }

    /// Records an acknowledgement of `report`, which becomes the base of deltas (the pending
    /// report file becomes it when it is still the newest).
    pub async fn record_ack(&self, acked: Acked, report: Arc<Report>) -> Result<(), StateError> {
        self.call(move |state| state.record_ack(&acked, || stored::encode(&report)))
            .await
    }

    /// Records a generation the relay refused for good.
    pub async fn save_rejected(&self, rejected: Rejected) -> Result<(), StateError> {
        self.call(move |state| state.save_rejected(&rejected)).await
    }

    /// Whether state can be written: the last write succeeded and the directory is writable.
    pub fn health(&self) -> Result<(), String> {
        if let Some(why) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(format!("the last state write failed: {why}"));
        }
        writable(&self.dir).map_err(|e| {
            format!(
                "state directory {} is not writable: {e}",
                self.dir.display()
            )
        })
    }
}

/// access(2) with W_OK: catches a read-only file system or lost permissions without writing.
fn writable(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in the path"))?;
    // SAFETY: access(2) on a NUL-terminated path that lives across the call.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::machine::MachineId;

    fn machine() -> MachineId {
        MachineId::Known("ab".repeat(32))
    }

    #[tokio::test]
    async fn writes_happen_in_order_off_the_async_thread() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), &machine()).unwrap();
        let writer = StateWriter::start(state).unwrap();
        let caller = std::thread::current().id();
        let on = writer
            .call(|_| Ok(std::thread::current().id()))
            .await
            .unwrap();
        assert_ne!(on, caller, "the write ran on the async thread");
        assert_eq!(writer.next_generation().await.unwrap(), 1);
        assert_eq!(writer.next_generation().await.unwrap(), 2);
        let report = Arc::new(Report {
            id: guestwatch_protocol::ReportId {
                epoch: writer.epoch(),
                generation: 2,
            },
            content_hash: guestwatch_protocol::ContentHash([0xab; 32]),
            facts: guestwatch_protocol::ReportFacts::default(),
            body: guestwatch_protocol::ReportBody::Full(guestwatch_protocol::Payload::json(
                b"{}".to_vec(),
            )),
        });
        writer
            .record_ack(
                Acked {
                    generation: 2,
                    content_hash: "ab".repeat(32),
                },
                report,
            )
            .await
            .unwrap();
        assert!(dir.path().join("base").is_file(), "the base is kept");
        assert!(writer.health().is_ok());
        drop(writer);
        let state = StateDir::open(dir.path(), &machine()).unwrap();
        assert_eq!(state.generation(), 2);
        assert_eq!(state.load_acked().unwrap().unwrap().generation, 2);
    }

    #[tokio::test]
    async fn a_failed_write_makes_it_unhealthy_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), &machine()).unwrap();
        let writer = StateWriter::start(state).unwrap();
        // A directory where the generation file should be: its rename fails.
        std::fs::remove_file(dir.path().join("generation")).unwrap();
        std::fs::create_dir(dir.path().join("generation")).unwrap();
        std::fs::write(dir.path().join("generation/x"), "").unwrap();
        assert!(writer.next_generation().await.is_err());
        let why = writer.health().unwrap_err();
        assert!(why.contains("generation"), "{why}");
        std::fs::remove_dir_all(dir.path().join("generation")).unwrap();
        writer.next_generation().await.unwrap();
        assert!(writer.health().is_ok());
    }
}
