//! The directory sink: per VM `DIR/vms/<vm>/latest.json` (the latest report, atomic, fsynced)
//! with `latest.id` (its report id and content hash) and `latest.document` (its compact
//! inventory, the base of the next delta after a relay restart); and two logs, one line per
//! delivery each, appended and fsynced before the guest is acknowledged: `DIR/deliveries.jsonl`
//! (the delivery record) and `DIR/changes.jsonl` (the change event, see `event.rs`).
//!
//! Order: the log lines first, then the VM's latest files. A relay stopped between the two has
//! logged a delivery whose `latest.json` is the previous one; the guest was not acknowledged,
//! sends again, and the delivery is logged again (the same idempotency key): the logs are
//! at-least-once, never missing a delivery the sink's latest files show.
//!
//! Durability: a file's data is fsynced before it takes its name (exchanged with the previous
//! version, which stays as `<name>.spare` and is overwritten by the next delivery, so no inode
//! is allocated per delivery; see [`spare`]), and a directory is fsynced whenever an entry in
//! it is created or replaced (a new VM directory, `latest.json`,
//! `deliveries.jsonl`), since a new name is on disk only once its directory is. An append to the
//! delivery log either lands whole or the file is cut back to its previous length, so a failed
//! write (disk full, file size limit, I/O error) never leaves a torn line. The relay must be the
//! log's only writer.
//!
//! Different VMs' files are written in parallel (delivery is already serialised per VM). The
//! delivery log is group-committed: one writer thread appends every line waiting for it and
//! fsyncs once for all of them, so its cost does not grow with the number of concurrent
//! deliveries.

use std::{
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::mpsc,
    time::SystemTime,
};

use tokio::sync::oneshot;

use super::{
    Delivery, DeliveryRecord, ENVELOPE_TAIL, SinkError, StoredInventory, envelope_head,
    event::{ChangeEvent, Changes},
};

/// A delivery's two log lines (deliveries, changes) and who waits for them.
type Append = (Vec<u8>, Vec<u8>, oneshot::Sender<Result<(), SinkError>>);

pub struct DirSink {
    root: PathBuf,
    log: mpsc::Sender<Append>,
}

/// The first line of `latest.document`: a tag, then the report id and content hash.
const DOCUMENT_TAG: &str = "guestwatch-inventory-1";

fn io(path: &Path) -> impl FnOnce(io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DirSink {
    pub async fn open(root: PathBuf) -> Result<Self, SinkError> {
        let vms = root.join("vms");
        let deliveries = root.join("deliveries.jsonl");
        let changes = root.join("changes.jsonl");
        let logs = tokio::task::spawn_blocking(move || -> Result<_, SinkError> {
            create_dir_synced(&vms).map_err(io(&vms))?;
            let open = |path: PathBuf| AppendLog::open(path.clone()).map_err(io(&path));
            Ok([open(deliveries)?, open(changes)?])
        })
        .await
        .map_err(|e| SinkError::Io {
            path: root.clone(),
            source: io::Error::other(e),
        })??;
        let (sender, lines) = mpsc::channel::<Append>();
        std::thread::Builder::new()
            .name("dir-sink-log".into())
            .spawn(move || group_commit(logs, lines))
            .map_err(io(&root))?;
        Ok(Self { root, log: sender })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub async fn deliver(&self, delivery: &Delivery, changes: &Changes) -> Result<u64, SinkError> {
        let delivered_at = SystemTime::now();
        let log_error = |name: &str, e: serde_json::Error| SinkError::Io {
            path: self.root.join(name),
            source: io::Error::other(e),
        };
        let mut line = serde_json::to_vec(&DeliveryRecord::new(delivery, delivered_at))
            .map_err(|e| log_error("deliveries.jsonl", e))?;
        line.push(b'\n');
        let mut event = ChangeEvent::new(delivery, changes, delivered_at)
            .to_json()
            .map_err(|e| log_error("changes.jsonl", e))?;
        event.push(b'\n');
        let logged = (line.len() + event.len()) as u64;
        let root = self.root.clone();
        let log = self.log.clone();
        let to_write = delivery.clone();
        // Blocking file I/O with fsync: keep it off the async workers.
        let latest_bytes = tokio::task::spawn_blocking(move || {
            let vm_dir = root.join("vms").join(&to_write.vm);
            create_dir_synced(&vm_dir).map_err(io(&vm_dir))?;
            // The log lines first (see the module's docs).
            let closed = || SinkError::Io {
                path: root.join("deliveries.jsonl"),
                source: io::Error::other("the delivery log writer stopped"),
            };
            let (done, committed) = oneshot::channel();
            log.send((line, event, done)).map_err(|_| closed())?;
            committed.blocking_recv().map_err(|_| closed())??;
            write_latest(&vm_dir, &to_write, delivered_at)
        })
        .await
        .map_err(|e| SinkError::Io {
            path: self.root.clone(),
            source: io::Error::other(e),
        })??;
        Ok(latest_bytes + logged)
    }

    /// The VM's latest compact inventory, if the sink holds one.
    pub async fn latest_inventory(&self, vm: &str) -> Result<Option<StoredInventory>, SinkError> {
        let path = self.root.join("vms").join(vm).join("latest.document");
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        // A damaged file is no inventory: the guest is asked for a full report.
        Ok(parse_document_file(&bytes))
    }

    /// The content hash recorded with the VM's latest report.
    pub async fn latest_hash(&self, vm: &str) -> Result<Option<String>, SinkError> {
        let path = self.root.join("vms").join(vm).join("latest.id");
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(text.split_whitespace().nth(1).map(str::to_owned)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

/// A log: appends that land whole or not at all.
struct AppendLog {
    path: PathBuf,
    file: File,
    /// The length of the log's whole lines.
    len: u64,
    /// A failed append could not be cut back yet: do that before the next one.
    torn: bool,
}

impl AppendLog {
    /// Opens (creating, and then fsyncing its directory) the log at `path`.
    fn open(path: PathBuf) -> io::Result<Self> {
        let existed = path.exists();
        let file = File::options().create(true).append(true).open(&path)?;
        if !existed {
            sync_dir(parent_of(&path))?;
        }
        let len = file.metadata()?.len();
        Ok(Self {
            path,
            file,
            len,
            torn: false,
        })
    }

    /// Appends `bytes` and fsyncs; on any failure the file is cut back to its previous length.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.torn {
            self.cut_back()?;
        }
        // One write for the batch: with O_APPEND the lines land in order.
        match self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.torn = true;
                // If this fails too, the next append tries again before writing.
                let _ = self.cut_back();
                Err(e)
            }
        }
    }

    fn cut_back(&mut self) -> io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_data()?;
        self.torn = false;
        Ok(())
    }
}

/// Appends every waiting delivery's lines to both logs, fsyncing each log once, answers them
/// all; until the sink is dropped.
fn group_commit(mut logs: [AppendLog; 2], lines: mpsc::Receiver<Append>) {
    while let Ok(first) = lines.recv() {
        let mut batch = vec![first];
        batch.extend(lines.try_iter());
        let mut result = Ok(());
        for (i, log) in logs.iter_mut().enumerate() {
            let mut bytes = Vec::new();
            for (deliveries, changes, _) in &batch {
                bytes.extend_from_slice(if i == 0 { deliveries } else { changes });
            }
            if let Err(e) = log.append(&bytes) {
                result = Err((log.path.clone(), e));
                break;
            }
        }
        for (_, _, done) in batch {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err((path, e)) => Err(SinkError::Io {
                    path: path.clone(),
                    source: io::Error::new(e.kind(), e.to_string()),
                }),
            };
            let _ = done.send(answer);
        }
    }
}

/// Reads `latest.document`: the tag line, then the compact document payload.
fn parse_document_file(bytes: &[u8]) -> Option<StoredInventory> {
    let newline = bytes.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(&bytes[..newline]).ok()?;
    let mut fields = head.split(' ');
    let (Some(DOCUMENT_TAG), Some(report_id), Some(hash), Some(encoding), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return None;
    };
    let encoding = match encoding {
        "zstd" => guestwatch_protocol::PayloadEncoding::DocumentZstd,
        "plain" => guestwatch_protocol::PayloadEncoding::Document,
        _ => return None,
    };
    Some(StoredInventory {
        report_id: report_id.to_owned(),
        content_hash: guestwatch_protocol::ContentHash::from_hex(hash)?,
        payload: guestwatch_protocol::Payload {
            encoding,
            bytes: bytes[newline + 1..].to_vec(),
        },
    })
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, fsyncing the parent of each one it creates.
fn create_dir_synced(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = parent_of(dir);
    if parent != dir {
        create_dir_synced(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        // Another delivery created it meanwhile (it synced the parent).
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes the VM's `latest.json`, `latest.id` and `latest.document` into `vm_dir`; returns the
/// bytes written.
fn write_latest(
    vm_dir: &Path,
    delivery: &Delivery,
    delivered_at: SystemTime,
) -> Result<u64, SinkError> {
    let latest = vm_dir.join("latest.json");
    let head = envelope_head(delivery, delivered_at).map_err(|e| SinkError::Io {
        path: latest.clone(),
        source: io::Error::other(e),
    })?;
    let body: [&[u8]; 3] = [&head, &delivery.report, ENVELOPE_TAIL];
    // Both files are written and fsynced, then renamed into place, then the directory is
    // fsynced once: the sidecar (report id and hash, read back to recognise duplicates
    // without parsing latest.json) never describes a latest.json that is not there.
    let id = format!("{} {}\n", delivery.report_id, delivery.content_hash);
    let id: [&[u8]; 1] = [id.as_bytes()];
    let document_path = vm_dir.join("latest.document");
    let document_head = delivery.inventory.as_ref().map(|p| {
        let encoding = if p.encoding == guestwatch_protocol::PayloadEncoding::DocumentZstd {
            "zstd"
        } else {
            "plain"
        };
        format!(
            "{DOCUMENT_TAG} {} {} {encoding}\n",
            delivery.report_id, delivery.content_hash
        )
    });
    let document: Option<[&[u8]; 2]> = document_head
        .as_ref()
        .zip(delivery.inventory.as_ref())
        .map(|(head, p)| [head.as_bytes(), p.bytes.as_slice()]);
    let mut files: Vec<(PathBuf, &[&[u8]])> =
        vec![(latest, &body), (vm_dir.join("latest.id"), &id)];
    match &document {
        Some(parts) => files.push((document_path, parts)),
        // An inventory of an earlier report must not pass for this one's.
        None => match std::fs::remove_file(&document_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&document_path)(e)),
        },
    }
    for (path, parts) in &files {
        if let Err(e) = write_synced(&spare(path), parts) {
            let _ = std::fs::remove_file(spare(path));
            return Err(io(path)(e));
        }
    }
    for (path, _) in &files {
        put_in_place(&spare(path), path).map_err(io(path))?;
    }
    sync_dir(vm_dir).map_err(io(vm_dir))?;
    Ok(files
        .iter()
        .flat_map(|(_, parts)| parts.iter())
        .map(|p| p.len() as u64)
        .sum())
}

/// The file a latest file's next version is written to before it takes the name. After a
/// delivery it holds the previous version, and the next delivery writes over it: the same
/// inode again and again. A new file per write would have ext4 allocate an inode per
/// delivery, skipping the recently deleted ones, which at a fleet's rate cost more CPU than
/// writing the report (found with perf in `cargo xtask bench load`).
fn spare(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".spare");
    PathBuf::from(name)
}

/// Gives `spare`'s contents the name `path`, atomically: the two names are exchanged when
/// `path` exists (`renameat2(RENAME_EXCHANGE)`), else (or where the filesystem cannot
/// exchange) `spare` is renamed over it.
fn put_in_place(spare: &Path, path: &Path) -> io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt};
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(spare)?, c(path)?);
    // SAFETY: both paths are NUL-terminated strings that live across the call; renameat2
    // only reads them.
    let exchanged = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if exchanged == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        // No file at `path` yet, or a filesystem without exchange.
        Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
            std::fs::rename(spare, path)
        }
        _ => Err(error),
    }
}

/// Writes `parts` one after the other into the file at `path` (created, or truncated), and
/// fsyncs it.
fn write_synced(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let mut file = File::create(path)?;
    for part in parts {
        file.write_all(part)?;
    }
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
        sink.deliver(&delivery("vm1", 1, "aa"), &Default::default())
            .await
            .unwrap();
        sink.deliver(&delivery("vm1", 2, "bb"), &Default::default())
            .await
            .unwrap();
        sink.deliver(&delivery("vm2", 1, "cc"), &Default::default())
            .await
            .unwrap();

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

    fn with_detail(generation: u64, hash: &str) -> Delivery {
        let mut d = delivery("vm1", generation, hash);
        d.trigger.detail = Some("d".repeat(4096));
        d
    }

    fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("deliveries.jsonl"))
            .unwrap()
            .split_inclusive('\n')
            .map(|l| {
                assert!(l.ends_with('\n'), "a torn line: {l:?}");
                serde_json::from_str(l).unwrap()
            })
            .collect()
    }

    const FSIZE_CHILD: &str = "GUESTWATCH_TEST_FSIZE_CHILD";

    /// A real failure: the process's file size limit (RLIMIT_FSIZE) stops the log's append
    /// half-way. Runs in a child process (this test binary again) since the limit is
    /// process-wide.
    #[tokio::test]
    async fn a_failed_append_is_cut_back_and_the_next_one_lands_whole() {
        if let Some(dir) = std::env::var_os(FSIZE_CHILD) {
            return fsize_child(Path::new(&dir)).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sink::dir::tests::a_failed_append_is_cut_back_and_the_next_one_lands_whole",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(FSIZE_CHILD, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("child: cut back and delivered"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let ids: Vec<String> = log_lines(dir.path())
            .iter()
            .map(|l| l["report_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            ids,
            [
                "00000000000000aa-1",
                "00000000000000aa-2",
                "00000000000000aa-4"
            ],
            "the failed delivery left nothing, the next one is whole"
        );
    }

    async fn fsize_child(dir: &Path) {
        let sink = DirSink::open(dir.to_path_buf()).await.unwrap();
        sink.deliver(&with_detail(1, "aa"), &Default::default())
            .await
            .unwrap();
        sink.deliver(&with_detail(2, "bb"), &Default::default())
            .await
            .unwrap();
        let log = dir.join("deliveries.jsonl");
        let before = std::fs::metadata(&log).unwrap().len();
        // Room for latest.json (about one line) but not for the whole next line in the log.
        let limit = before + 2000;
        // SAFETY: plain libc calls with valid arguments: ignoring SIGXFSZ makes a write over
        // the limit fail with EFBIG instead of killing the process; the rlimit struct is ours.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let mut rl = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut rl), 0);
            let lowered = libc::rlimit {
                rlim_cur: limit,
                rlim_max: rl.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lowered), 0);
            let failed = sink
                .deliver(&with_detail(3, "cc"), &Default::default())
                .await;
            assert!(failed.is_err(), "{failed:?}");
            assert_eq!(
                std::fs::metadata(&log).unwrap().len(),
                before,
                "the partial append was cut back"
            );
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rl), 0);
        }
        sink.deliver(&with_detail(4, "dd"), &Default::default())
            .await
            .unwrap();
        println!("child: cut back and delivered");
    }

    /// The latest files take their names by exchange with their spares: after the first
    /// deliveries, a delivery writes into files that exist rather than allocating new ones.
    #[tokio::test]
    async fn latest_files_are_replaced_without_new_inodes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let sink = DirSink::open(dir.path().to_path_buf()).await.unwrap();
        let vm = dir.path().join("vms/vm1");
        let inodes = || {
            let mut set: Vec<u64> = [
                "latest.json",
                "latest.json.spare",
                "latest.id",
                "latest.id.spare",
            ]
            .iter()
            .map(|name| std::fs::metadata(vm.join(name)).unwrap().ino())
            .collect();
            set.sort_unstable();
            set
        };
        for generation in 1..=2 {
            sink.deliver(&with_detail(generation, "aa"), &Default::default())
                .await
                .unwrap();
        }
        let before = inodes();
        for generation in 3..=5 {
            sink.deliver(
                &with_detail(generation, &format!("{generation:02x}")),
                &Default::default(),
            )
            .await
            .unwrap();
            assert_eq!(inodes(), before, "delivery {generation} allocated a file");
        }
        let latest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(vm.join("latest.json")).unwrap()).unwrap();
        assert_eq!(latest["delivery"]["content_hash"], "05");
        let id = std::fs::read_to_string(vm.join("latest.id")).unwrap();
        assert!(id.ends_with(" 05\n"), "{id}");
        let previous = std::fs::read_to_string(vm.join("latest.id.spare")).unwrap();
        assert!(
            previous.ends_with(" 04\n"),
            "the spare holds the previous version: {previous}"
        );
    }

    #[tokio::test]
    async fn the_sink_creates_its_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a/b/sink");
        let sink = DirSink::open(root.clone()).await.unwrap();
        sink.deliver(&delivery("vm1", 1, "aa"), &Default::default())
            .await
            .unwrap();
        assert!(root.join("vms/vm1/latest.json").is_file());
        assert!(root.join("deliveries.jsonl").is_file());
        // A VM directory that cannot be created is an error, not a panic.
        std::fs::write(root.join("vms/vm2"), b"in the way").unwrap();
        assert!(
            sink.deliver(&delivery("vm2", 1, "bb"), &Default::default())
                .await
                .is_err()
        );
        assert_eq!(log_lines(&root).len(), 1);
    }
}
