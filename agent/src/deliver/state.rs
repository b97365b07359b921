//! The agent's state directory: what must survive a crash or a reboot.
//!
//! - `epoch`: chosen once per installation (random 64 bits, hex). A report id is
//!   (epoch, generation), so a reinstalled agent never collides with its predecessor.
//! - `generation`: the last generation issued, persisted *before* a report carrying it leaves,
//!   so generations only ever grow, across restarts too.
//! - `pending`: the newest unacknowledged report, exactly as it goes on the wire; resent after
//!   a restart until acknowledged or superseded.
//! - `acked`: the generation and content hash of the last acknowledged report, so an agent
//!   restarted on an unchanged system does not send the same inventory again.
//!
//! Every write is atomic (temporary file, fsync, rename, fsync of the directory).

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

/// Why the state directory is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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

/// The state directory, opened.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    epoch: u64,
    generation: u64,
}

impl StateDir {
    /// Opens (creating if needed, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        create_private_dir(dir).map_err(io_err(dir))?;
        let epoch_path = dir.join("epoch");
        let epoch = match read_trimmed(&epoch_path).map_err(io_err(&epoch_path))? {
            Some(text) => match u64::from_str_radix(&text, 16) {
                Ok(epoch) if epoch != 0 => epoch,
                _ => {
                    log::warn!(
                        "{} is damaged ({text:?}); choosing a new epoch",
                        epoch_path.display()
                    );
                    new_epoch(&epoch_path)?
                }
            },
            None => new_epoch(&epoch_path)?,
        };
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
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
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

    /// Forgets the pending report (it was acknowledged).
    pub fn clear_pending(&self) -> Result<(), StateError> {
        let path = self.dir.join("pending");
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir).map_err(io_err(&self.dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
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

    #[test]
    fn epoch_is_stable_and_generations_grow_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let mut s = StateDir::open(&state_dir).unwrap();
        let epoch = s.epoch();
        assert_ne!(epoch, 0);
        assert_eq!(s.generation(), 0);
        assert_eq!(s.next_generation().unwrap(), 1);
        assert_eq!(s.next_generation().unwrap(), 2);
        drop(s);
        let mut s = StateDir::open(&state_dir).unwrap();
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.next_generation().unwrap(), 3);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&state_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn pending_and_acked_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
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
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn damaged_files_never_lower_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("epoch"), "not hex").unwrap();
        fs::write(dir.path().join("generation"), "garbage").unwrap();
        fs::write(dir.path().join("acked"), "x y").unwrap();
        let mut s = StateDir::open(dir.path()).unwrap();
        assert_ne!(s.epoch(), 0);
        assert!(s.next_generation().unwrap() > 1_600_000_000_000);
        assert_eq!(s.load_acked().unwrap(), None);
    }
}
