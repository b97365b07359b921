//! The agent's state directory: what must survive a crash or a reboot.
//!
//! - `epoch`: chosen per installation and machine (random 64 bits, hex). A report id is
//!   (epoch, generation), so a reinstalled agent never collides with its predecessor.
//! - `machine`: the hash of the machine-id the epoch belongs to, and why the epoch was chosen.
//!   A state directory copied to another machine (a VM cloned from an image) starts a new
//!   epoch there: the clones' report ids never collide.
//! - `generation`: the last generation issued, persisted *before* a report carrying it leaves,
//!   so generations only ever grow within an epoch, across restarts too.
//! - `pending`: the newest unacknowledged report, exactly as it goes on the wire; resent after
//!   a restart until acknowledged or superseded.
//! - `acked`: the generation and content hash of the last acknowledged report, so an agent
//!   restarted on an unchanged system does not send the same inventory again.
//! - `base`: that report itself (one frame, like `pending`), the base of delta reports after a
//!   restart. On an acknowledgement of the pending report, `pending` is renamed to `base`.
//! - `rejected`: the generation the relay refused for good, and the limits it announced then,
//!   so a restart does not send it again unless the relay's limits changed.
//!
//! Every write is atomic (temporary file, fsync, rename, fsync of the directory). The writes
//! happen on the state writer's thread (`writer.rs`), never on an async thread.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use super::machine::MachineId;

/// Why the state directory is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state writer stopped")]
    WriterGone,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What was last acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    pub generation: u64,
    /// The content hash, hex.
    pub content_hash: String,
}

/// A generation the relay refused for good, and the relay's limits at the time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub generation: u64,
    /// `too_large`, `malformed` or `rejected`.
    pub reason: String,
    pub max_frame: u32,
    pub max_report_payload: u32,
}

/// Why the current epoch was chosen (reported to the relay in `Hello`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochReason {
    /// No epoch yet: a new installation.
    NewInstallation,
    /// The state directory was made on another machine (a clone, or a copied directory).
    MachineIdChanged,
    /// The epoch file could not be read back.
    Damaged,
}

impl EpochReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NewInstallation => "new installation",
            Self::MachineIdChanged => "machine-id changed",
            Self::Damaged => "epoch file damaged",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::NewInstallation, Self::MachineIdChanged, Self::Damaged]
            .into_iter()
            .find(|r| r.as_str() == text)
    }
}

/// The machine binding as stored: the machine-id hash (`None`: there was no machine-id when the
/// epoch was chosen) and the reason for the epoch.
#[derive(Debug, PartialEq, Eq)]
struct Binding {
    machine: Option<String>,
    reason: Option<EpochReason>,
}

/// The state directory, opened.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    epoch: u64,
    generation: u64,
    reason: Option<EpochReason>,
}

impl StateDir {
    /// Opens (creating if needed, mode 0700) the state directory of the machine `machine`.
    pub fn open(dir: &Path, machine: &MachineId) -> Result<Self, StateError> {
        create_private_dir(dir).map_err(io_err(dir))?;
        let epoch_path = dir.join("epoch");
        let stored = read_trimmed(&epoch_path)
            .map_err(io_err(&epoch_path))?
            .map(|text| match u64::from_str_radix(&text, 16) {
                Ok(epoch) if epoch != 0 => Ok(epoch),
                _ => Err(text),
            });
        let binding = read_binding(dir)?;
        if let MachineId::Unknown(why) = machine {
            log::warn!("no machine-id ({why}): clones of this machine cannot be told apart");
        }
        let renew = match (&stored, &binding, machine.hash()) {
            (None, _, _) => Some(EpochReason::NewInstallation),
            (Some(Err(text)), _, _) => {
                log::warn!(
                    "{} is damaged ({text:?}); choosing a new epoch",
                    epoch_path.display()
                );
                Some(EpochReason::Damaged)
            }
            // Made by an agent that did not bind epochs yet: this machine's, as far as we know.
            (Some(Ok(_)), None, _) => None,
            (Some(Ok(_)), Some(b), Some(hash)) if b.machine.as_deref() != Some(hash) => {
                Some(EpochReason::MachineIdChanged)
            }
            // The same machine, or no machine-id to tell (kept: a read failure is no clone).
            (Some(Ok(_)), Some(_), _) => None,
        };
        let kept = match (&stored, renew) {
            (Some(Ok(epoch)), None) => Some(*epoch),
            _ => None,
        };
        let Some(epoch) = kept else {
            let reason = renew.unwrap_or(EpochReason::NewInstallation);
            let epoch = renew_epoch(dir, machine, reason)?;
            match reason {
                EpochReason::MachineIdChanged => log::warn!(
                    "state directory {} belongs to another machine (machine-id changed): new \
                     epoch {epoch:016x}; generations restart and the other machine's pending \
                     report is discarded",
                    dir.display()
                ),
                _ => log::info!("new epoch {epoch:016x} ({})", reason.as_str()),
            }
            return Ok(Self {
                dir: dir.to_path_buf(),
                epoch,
                generation: 0,
                reason: Some(reason),
            });
        };
        if binding.is_none()
            && let Some(hash) = machine.hash()
        {
            write_binding(
                dir,
                &Binding {
                    machine: Some(hash.to_owned()),
                    reason: None,
                },
            )?;
        }
        let generation_path = dir.join("generation");
        let generation = match read_trimmed(&generation_path).map_err(io_err(&generation_path))? {
            Some(text) => text.parse::<u64>().unwrap_or_else(|_| {
                // Never reuse a generation: fall back to the clock in milliseconds, far above
                // any counter this agent could have reached.
                let floor = unix_millis();
                log::warn!(
                    "{} is damaged ({text:?}); continuing from {floor}",
                    generation_path.display()
                );
                floor
            }),
            None => 0,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            epoch,
            generation,
            reason: binding.and_then(|b| b.reason),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Why this epoch was chosen, when known.
    pub fn epoch_reason(&self) -> Option<EpochReason> {
        self.reason
    }

    /// The last generation issued (0 before the first report).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Issues the next generation, persisting it first.
    pub fn next_generation(&mut self) -> Result<u64, StateError> {
        let next = self.generation.saturating_add(1);
        let path = self.dir.join("generation");
        write_atomic(&path, next.to_string().as_bytes()).map_err(io_err(&path))?;
        self.generation = next;
        Ok(next)
    }

    /// Stores the pending report (replacing any older one).
    pub fn save_pending(&self, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.dir.join("pending");
        write_atomic(&path, bytes).map_err(io_err(&path))
    }

    /// The pending report, if any.
    pub fn load_pending(&self) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.dir.join("pending");
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Forgets the pending report (it was acknowledged, or cannot be used).
    pub fn clear_pending(&self) -> Result<(), StateError> {
        remove(&self.dir, "pending")
    }

    /// Records the last acknowledged report.
    pub fn save_acked(&self, acked: &Acked) -> Result<(), StateError> {
        let path = self.dir.join("acked");
        write_atomic(
            &path,
            format!("{} {}\n", acked.generation, acked.content_hash).as_bytes(),
        )
        .map_err(io_err(&path))
    }

    /// The relay acknowledged `acked`: record it, then keep the report as the base — the
    /// pending report becomes it when it is that one, else `encoded` gives its bytes (a newer
    /// pending report stays on disk).
    pub fn record_ack(
        &self,
        acked: &Acked,
        encoded: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<(), StateError> {
        self.save_acked(acked)?;
        let base = self.dir.join("base");
        if self.generation == acked.generation && self.dir.join("pending").exists() {
            let pending = self.dir.join("pending");
            fs::rename(&pending, &base).map_err(io_err(&pending))?;
            return sync_dir(&self.dir).map_err(io_err(&self.dir));
        }
        match encoded() {
            Some(bytes) => write_atomic(&base, &bytes).map_err(io_err(&base)),
            // No base rather than a wrong one.
            None => remove(&self.dir, "base"),
        }
    }

    /// The last acknowledged report as stored (the base of deltas), if any.
    pub fn load_base(&self) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.dir.join("base");
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The last acknowledged report, if known (a damaged file counts as unknown).
    pub fn load_acked(&self) -> Result<Option<Acked>, StateError> {
        let path = self.dir.join("acked");
        let Some(text) = read_trimmed(&path).map_err(io_err(&path))? else {
            return Ok(None);
        };
        let mut parts = text.split_whitespace();
        Ok(
            match (parts.next().and_then(|g| g.parse().ok()), parts.next()) {
                (Some(generation), Some(hash)) if hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Some(Acked {
                        generation,
                        content_hash: hash.to_owned(),
                    })
                }
                _ => None,
            },
        )
    }

    /// Records that the relay refused a generation for good.
    pub fn save_rejected(&self, rejected: &Rejected) -> Result<(), StateError> {
        let path = self.dir.join("rejected");
        let line = format!(
            "{} {} {} {}\n",
            rejected.generation, rejected.reason, rejected.max_frame, rejected.max_report_payload
        );
        write_atomic(&path, line.as_bytes()).map_err(io_err(&path))
    }

    /// The last refused generation, if any (a damaged file counts as none).
    pub fn load_rejected(&self) -> Result<Option<Rejected>, StateError> {
        let path = self.dir.join("rejected");
        let Some(text) = read_trimmed(&path).map_err(io_err(&path))? else {
            return Ok(None);
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [generation, reason, max_frame, max_report_payload] = parts[..] else {
            return Ok(None);
        };
        Ok(
            match (
                generation.parse(),
                max_frame.parse(),
                max_report_payload.parse(),
            ) {
                (Ok(generation), Ok(max_frame), Ok(max_report_payload))
                    if reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
                {
                    Some(Rejected {
                        generation,
                        reason: reason.to_owned(),
                        max_frame,
                        max_report_payload,
                    })
                }
                _ => None,
            },
        )
    }
}

/// Starts a new epoch for `machine`. Each step is atomic and the binding is written last, so a
/// crash part way leaves a mismatch that the next start resolves the same way.
fn renew_epoch(dir: &Path, machine: &MachineId, reason: EpochReason) -> Result<u64, StateError> {
    // What belonged to the old epoch goes first: a report of another machine is never resent.
    for name in ["pending", "acked", "base", "rejected"] {
        remove(dir, name)?;
    }
    let epoch = new_epoch(&dir.join("epoch"))?;
    let generation = dir.join("generation");
    write_atomic(&generation, b"0").map_err(io_err(&generation))?;
    write_binding(
        dir,
        &Binding {
            machine: machine.hash().map(str::to_owned),
            reason: Some(reason),
        },
    )?;
    Ok(epoch)
}

fn read_binding(dir: &Path) -> Result<Option<Binding>, StateError> {
    let path = dir.join("machine");
    let Some(text) = read_trimmed(&path).map_err(io_err(&path))? else {
        return Ok(None);
    };
    let mut lines = text.lines();
    let machine = match lines.next().map(str::trim) {
        Some(hash) if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(hash.to_owned())
        }
        // "none", or damaged: either way no machine this one could match.
        _ => None,
    };
    Ok(Some(Binding {
        machine,
        reason: lines.next().and_then(|r| EpochReason::parse(r.trim())),
    }))
}

fn write_binding(dir: &Path, binding: &Binding) -> Result<(), StateError> {
    let path = dir.join("machine");
    let text = format!(
        "{}\n{}\n",
        binding.machine.as_deref().unwrap_or("none"),
        binding.reason.map_or("", EpochReason::as_str)
    );
    write_atomic(&path, text.as_bytes()).map_err(io_err(&path))
}

fn remove(dir: &Path, name: &str) -> Result<(), StateError> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir).map_err(io_err(dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn new_epoch(path: &Path) -> Result<u64, StateError> {
    let epoch = loop {
        let candidate = fastrand::u64(..);
        if candidate != 0 {
            break candidate;
        }
    };
    write_atomic(path, format!("{epoch:016x}\n").as_bytes()).map_err(io_err(path))?;
    Ok(epoch)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(u64::MAX / 2)
}

fn read_trimmed(path: &Path) -> io::Result<Option<String>> {
    match fs::read(path) {
        // Bounded: these files hold a number or two.
        Ok(bytes) => Ok(Some(
            String::from_utf8_lossy(&bytes[..bytes.len().min(256)])
                .trim()
                .to_owned(),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(n: u8) -> MachineId {
        MachineId::Known(format!("{n:02x}").repeat(32))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn epoch_is_stable_and_generations_grow_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let mut s = StateDir::open(&state_dir, &machine(1)).unwrap();
        let epoch = s.epoch();
        assert_ne!(epoch, 0);
        assert_eq!(s.epoch_reason(), Some(EpochReason::NewInstallation));
        assert_eq!(s.generation(), 0);
        assert_eq!(s.next_generation().unwrap(), 1);
        assert_eq!(s.next_generation().unwrap(), 2);
        drop(s);
        let mut s = StateDir::open(&state_dir, &machine(1)).unwrap();
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.epoch_reason(), Some(EpochReason::NewInstallation));
        assert_eq!(s.next_generation().unwrap(), 3);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&state_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn pending_acked_and_rejected_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateDir::open(dir.path(), &machine(1)).unwrap();
        assert_eq!(s.load_pending().unwrap(), None);
        s.save_pending(b"frame-1").unwrap();
        s.save_pending(b"frame-2").unwrap();
        assert_eq!(s.load_pending().unwrap().as_deref(), Some(&b"frame-2"[..]));
        s.clear_pending().unwrap();
        s.clear_pending().unwrap();
        assert_eq!(s.load_pending().unwrap(), None);
        assert_eq!(s.load_acked().unwrap(), None);
        let acked = Acked {
            generation: 7,
            content_hash: "ab12".into(),
        };
        s.save_acked(&acked).unwrap();
        assert_eq!(s.load_acked().unwrap(), Some(acked));
        assert_eq!(s.load_rejected().unwrap(), None);
        let rejected = Rejected {
            generation: 3,
            reason: "too_large".into(),
            max_frame: 4096,
            max_report_payload: 1 << 26,
        };
        s.save_rejected(&rejected).unwrap();
        assert_eq!(s.load_rejected().unwrap(), Some(rejected));
        // An acknowledgement clears the pending report only while it is the newest.
        let g = s.next_generation().unwrap();
        s.save_pending(b"frame-g").unwrap();
        let older = Acked {
            generation: g - 1,
            content_hash: "cd".into(),
        };
        s.record_ack(&older, || Some(b"frame-older".to_vec()))
            .unwrap();
        assert!(s.load_pending().unwrap().is_some());
        assert_eq!(s.load_base().unwrap().as_deref(), Some(&b"frame-older"[..]));
        let newest = Acked {
            generation: g,
            content_hash: "ef".into(),
        };
        // The pending report becomes the base without being written again.
        s.record_ack(&newest, || panic!("not encoded again"))
            .unwrap();
        assert_eq!(s.load_pending().unwrap(), None);
        assert_eq!(s.load_base().unwrap().as_deref(), Some(&b"frame-g"[..]));
        assert_eq!(s.load_acked().unwrap(), Some(newest));
        // No temporary files are left behind.
        let names = names(dir.path());
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn damaged_files_never_lower_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        StateDir::open(dir.path(), &machine(1)).unwrap();
        fs::write(dir.path().join("generation"), "garbage").unwrap();
        fs::write(dir.path().join("acked"), "x y").unwrap();
        fs::write(dir.path().join("rejected"), "1 TOO LARGE").unwrap();
        let mut s = StateDir::open(dir.path(), &machine(1)).unwrap();
        assert!(s.next_generation().unwrap() > 1_600_000_000_000);
        assert_eq!(s.load_acked().unwrap(), None);
        assert_eq!(s.load_rejected().unwrap(), None);
        fs::write(dir.path().join("epoch"), "not hex").unwrap();
        let s = StateDir::open(dir.path(), &machine(1)).unwrap();
        assert_ne!(s.epoch(), 0);
        assert_eq!(s.epoch_reason(), Some(EpochReason::Damaged));
    }

    #[test]
    fn another_machine_id_means_a_new_epoch_without_the_old_reports() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateDir::open(dir.path(), &machine(1)).unwrap();
        let epoch = s.epoch();
        s.next_generation().unwrap();
        s.next_generation().unwrap();
        s.save_pending(b"frame").unwrap();
        s.save_acked(&Acked {
            generation: 1,
            content_hash: "ab".into(),
        })
        .unwrap();
        drop(s);
        // The copy (a clone of the image) runs on another machine.
        let clone = tempfile::tempdir().unwrap();
        for name in names(dir.path()) {
            fs::copy(dir.path().join(&name), clone.path().join(&name)).unwrap();
        }
        let s = StateDir::open(clone.path(), &machine(2)).unwrap();
        assert_ne!(s.epoch(), epoch);
        assert_eq!(s.generation(), 0);
        assert_eq!(s.epoch_reason(), Some(EpochReason::MachineIdChanged));
        assert_eq!(s.load_pending().unwrap(), None);
        assert_eq!(s.load_acked().unwrap(), None);
        let clone_epoch = s.epoch();
        drop(s);
        // The new binding is persisted, with its reason.
        let s = StateDir::open(clone.path(), &machine(2)).unwrap();
        assert_eq!(s.epoch(), clone_epoch);
        assert_eq!(s.epoch_reason(), Some(EpochReason::MachineIdChanged));
        // The original keeps its epoch; an unreadable machine-id changes nothing either.
        let s = StateDir::open(dir.path(), &machine(1)).unwrap();
        assert_eq!((s.epoch(), s.generation()), (epoch, 2));
        let s = StateDir::open(dir.path(), &MachineId::Unknown("gone".into())).unwrap();
        assert_eq!(s.epoch(), epoch);
    }

    #[test]
    fn state_of_older_agents_is_adopted_and_unbound_images_rebind() {
        let dir = tempfile::tempdir().unwrap();
        // An older agent wrote no binding: the epoch is kept and bound to this machine now.
        fs::write(dir.path().join("epoch"), "00000000000000aa\n").unwrap();
        fs::write(dir.path().join("generation"), "5").unwrap();
        let s = StateDir::open(dir.path(), &machine(1)).unwrap();
        assert_eq!(
            (s.epoch(), s.generation(), s.epoch_reason()),
            (0xaa, 5, None)
        );
        let s = StateDir::open(dir.path(), &machine(2)).unwrap();
        assert_ne!(s.epoch(), 0xaa);
        // An image prepared without a machine-id: each machine booting it starts its own epoch.
        let image = tempfile::tempdir().unwrap();
        let unknown = MachineId::Unknown("uninitialized".into());
        let first = StateDir::open(image.path(), &unknown).unwrap().epoch();
        assert_eq!(
            StateDir::open(image.path(), &unknown).unwrap().epoch(),
            first
        );
        let booted = StateDir::open(image.path(), &machine(3)).unwrap();
        assert_ne!(booted.epoch(), first);
        assert_eq!(booted.epoch_reason(), Some(EpochReason::MachineIdChanged));
    }
}
