//! The directory sink: `DIR/vms/<vm>/latest.json` (atomic, fsynced) and `DIR/deliveries.jsonl`
//! (one line per delivery, appended and fsynced before the guest is acknowledged).
//!
//! Different VMs' files are written in parallel (delivery is already serialised per VM). The
//! delivery log is group-committed: one writer thread appends every line waiting for it and
//! fsyncs once for all of them, so its cost does not grow with the number of concurrent
//! deliveries.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::mpsc,
    time::SystemTime,
};

use tokio::sync::oneshot;

use super::{Delivery, DeliveryRecord, SinkError, envelope};

type Append = (Vec<u8>, oneshot::Sender<Result<(), SinkError>>);

pub struct DirSink {
    root: PathBuf,
    log: mpsc::Sender<Append>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DirSink {
    pub async fn open(root: PathBuf) -> Result<Self, SinkError> {
        let vms = root.join("vms");
        tokio::fs::create_dir_all(&vms).await.map_err(io(&vms))?;
        let path = root.join("deliveries.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let (log, lines) = mpsc::channel::<Append>();
        std::thread::Builder::new()
            .name("dir-sink-log".into())
            .spawn(move || group_commit(file, path, lines))
            .map_err(io(&root))?;
        Ok(Self { root, log })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub async fn deliver(&self, delivery: &Delivery) -> Result<(), SinkError> {
        let delivered_at = SystemTime::now();
        let root = self.root.clone();
        let to_write = delivery.clone();
        // Blocking file I/O with fsync: keep it off the async workers.
        tokio::task::spawn_blocking(move || write_latest(&root, &to_write, delivered_at))
            .await
            .map_err(|e| SinkError::Io {
                path: self.root.clone(),
                source: std::io::Error::other(e),
            })??;
        let mut line = serde_json::to_vec(&DeliveryRecord {
            delivery,
            delivered_at,
        })
        .map_err(|e| SinkError::Io {
            path: self.root.join("deliveries.jsonl"),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let (done, committed) = oneshot::channel();
        let closed = || SinkError::Io {
            path: self.root.join("deliveries.jsonl"),
            source: std::io::Error::other("the delivery log writer stopped"),
        };
        self.log.send((line, done)).map_err(|_| closed())?;
        committed.await.map_err(|_| closed())?
    }

    /// The content hash recorded with the VM's latest report.
    pub async fn latest_hash(&self, vm: &str) -> Result<Option<String>, SinkError> {
        let path = self.root.join("vms").join(vm).join("latest.id");
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(text.split_whitespace().nth(1).map(str::to_owned)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

/// Appends every waiting line, fsyncs once, answers them all; until the sink is dropped.
fn group_commit(mut file: std::fs::File, path: PathBuf, lines: mpsc::Receiver<Append>) {
    while let Ok(first) = lines.recv() {
        let mut batch = vec![first];
        batch.extend(lines.try_iter());
        let mut bytes = Vec::with_capacity(batch.iter().map(|(l, _)| l.len()).sum());
        for (line, _) in &batch {
            bytes.extend_from_slice(line);
        }
        // One write for the batch: with O_APPEND the lines land whole and in order.
        let result = file.write_all(&bytes).and_then(|()| file.sync_data());
        for (_, done) in batch {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(SinkError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(e.kind(), e.to_string()),
                }),
            };
            let _ = done.send(answer);
        }
    }
}

fn write_latest(
    root: &Path,
    delivery: &Delivery,
    delivered_at: SystemTime,
) -> Result<(), SinkError> {
    let vm_dir = root.join("vms").join(&delivery.vm);
    std::fs::create_dir_all(&vm_dir).map_err(io(&vm_dir))?;
    let latest = vm_dir.join("latest.json");
    let body = envelope(delivery, delivered_at).map_err(|e| SinkError::Io {
        path: latest.clone(),
        source: std::io::Error::other(e),
    })?;
    // Both files are written and fsynced, then renamed into place, then the directory is
    // fsynced once: the sidecar (report id and hash, read back to recognise duplicates
    // without parsing latest.json) never describes a latest.json that is not there.
    let id = format!("{} {}\n", delivery.report_id, delivery.content_hash);
    let files = [(latest, body), (vm_dir.join("latest.id"), id.into_bytes())];
    let tmp = |path: &Path| {
        let mut name = path.as_os_str().to_owned();
        name.push(".tmp");
        PathBuf::from(name)
    };
    for (path, bytes) in &files {
        write_synced(&tmp(path), bytes).map_err(io(path))?;
    }
    for (path, _) in &files {
        std::fs::rename(tmp(path), path).map_err(io(path))?;
    }
    std::fs::File::open(&vm_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&vm_dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::tests::delivery;

    #[tokio::test]
    async fn writes_latest_and_appends_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let sink = DirSink::open(dir.path().to_path_buf()).await.unwrap();
        assert_eq!(sink.latest_hash("vm1").await.unwrap(), None);
        sink.deliver(&delivery("vm1", 1, "aa")).await.unwrap();
        sink.deliver(&delivery("vm1", 2, "bb")).await.unwrap();
        sink.deliver(&delivery("vm2", 1, "cc")).await.unwrap();

        let latest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("vms/vm1/latest.json")).unwrap())
                .unwrap();
        assert_eq!(latest["delivery"]["report_id"], "00000000000000aa-2");
        assert_eq!(latest["report"]["success"], true);
        assert_eq!(
            sink.latest_hash("vm1").await.unwrap().as_deref(),
            Some("bb")
        );
        assert_eq!(
            sink.latest_hash("vm2").await.unwrap().as_deref(),
            Some("cc")
        );

        let log = std::fs::read_to_string(dir.path().join("deliveries.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["vm"], "vm1");
        assert_eq!(lines[1]["content_hash"], "bb");
        assert!(lines[2]["delivered_at"].is_string());
        // No temporary files remain.
        assert!(!dir.path().join("vms/vm1/latest.json.tmp").exists());
    }
}
