//! Decoding ring-buffer records into userspace types.
//!
//! Records are decoded field by field from bytes, not cast, so a short or unknown record is a
//! typed error rather than undefined behaviour.

use guestwatch_agent_common::{
    AT_FDCWD, CMDLINE_LEN, COMM_LEN, EventKind, FileEvent, FileOp, MAX_ANCESTORS, PATH_LEN,
    TxEvent, TxStartEvent, UNSET,
};

/// A transaction boundary seen in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxRecord {
    /// `TxStart`, `TxEnd`, `TxAbort` (the thread died inside `rpmtsRun`) or `TxExit` (the
    /// process, which ran a transaction, exited).
    pub kind: EventKind,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub ret: i32,
    /// The audit login uid and session id, when set and known.
    pub loginuid: Option<u32>,
    pub sessionid: Option<u32>,
    /// On `TxEnd`/`TxAbort`: watched-file writes the process made inside the transaction.
    pub writes: u32,
    pub cookie: u64,
    /// `CLOCK_BOOTTIME` ns; with the tgid, the transaction's identity. 0 when the start was not
    /// observed.
    pub start_ns: u64,
    /// `CLOCK_BOOTTIME` ns of the record.
    pub now_ns: u64,
    pub comm: String,
    /// On `TxStart`: parents (tgid, comm), nearest first, as the kernel saw them.
    pub ancestors: Vec<(u32, String)>,
    /// On `TxStart`: the command line's bytes (`argv`, NUL-separated), when readable.
    pub cmdline: Vec<u8>,
}

/// A file-level change of a watched path, as the kernel saw it: inside a transaction
/// (`tx_start_ns` set) or by a process outside any (the tamper signal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    pub op: FileOp,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The descriptor written through, for [`FileOp::Write`].
    pub fd: Option<i32>,
    pub flags: u32,
    /// The directory descriptors `path` and `path2` are relative to (`None`: the working
    /// directory).
    pub dirfd: Option<i32>,
    pub dirfd2: Option<i32>,
    /// `CLOCK_BOOTTIME` ns of the record.
    pub now_ns: u64,
    /// The transaction (its start) the process is inside, or with `tail` the one it ran
    /// last; `None` for tampering.
    pub tx_start_ns: Option<u64>,
    /// A write after the process's transaction ended (SQLite's checkpoint on close).
    pub tail: bool,
    /// The written file (for [`FileOp::Write`]), as the kernel knows it.
    pub file: Option<FileId>,
    /// The directories relative `path` and `path2` are relative to, read when the call was
    /// made.
    pub dir: Option<FileId>,
    pub dir2: Option<FileId>,
    pub comm: String,
    /// The path as the process passed it (may be relative), lossily UTF-8.
    pub path: String,
    /// The rename destination.
    pub path2: Option<String>,
}

/// A file's identity as `stat` reports it (`st_dev`, `st_ino`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// From the kernel's `dev_t` encoding (`major << 20 | minor`); `None` when unknown.
    fn from_kernel(ino: u64, dev: u32) -> Option<Self> {
        (ino != 0).then(|| Self {
            dev: libc::makedev(dev >> 20, dev & 0xf_ffff),
            ino,
        })
    }

    /// The identity of the file at `path` (not following a final symlink).
    pub fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Any record from the ring buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BpfRecord {
    Tx(TxRecord),
    File(FileRecord),
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is too short")]
    Short(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown file operation {0}")]
    UnknownOp(u32),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.at + N;
        let chunk = self
            .bytes
            .get(self.at..end)
            .ok_or(DecodeError::Short(self.bytes.len()))?;
        self.at = end;
        let mut out = [0u8; N];
        out.copy_from_slice(chunk);
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.take::<4>().map(u32::from_ne_bytes)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.take::<8>().map(u64::from_ne_bytes)
    }
}

/// A NUL-padded kernel string (command name, path) up to its first NUL, lossily as UTF-8.
pub fn comm_to_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<BpfRecord, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let raw_kind = r.u32()?;
    match EventKind::from_u32(raw_kind) {
        Some(
            kind @ (EventKind::TxStart | EventKind::TxEnd | EventKind::TxAbort | EventKind::TxExit),
        ) => decode_tx(kind, r).map(BpfRecord::Tx),
        Some(EventKind::File) => decode_file(r).map(BpfRecord::File),
        None => Err(DecodeError::UnknownKind(raw_kind)),
    }
}

fn decode_file(mut r: Reader<'_>) -> Result<FileRecord, DecodeError> {
    if r.bytes.len() < FileEvent::SIZE {
        return Err(DecodeError::Short(r.bytes.len()));
    }
    let raw_op = r.u32()?;
    let op = FileOp::from_u32(raw_op).ok_or(DecodeError::UnknownOp(raw_op))?;
    let tgid = r.u32()?;
    let pid = r.u32()?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let fd = r.u32()? as i32;
    let flags = r.u32()?;
    let dirfd = r.u32()? as i32;
    let dirfd2 = r.u32()? as i32;
    let now_ns = r.u64()?;
    let tx_start_ns = r.u64()?;
    let tail = r.u32()? != 0;
    let _pad = r.u32()?;
    let mut inode = || -> Result<Option<FileId>, DecodeError> {
        let ino = r.u64()?;
        let dev = r.u32()?;
        let _pad = r.u32()?;
        Ok(FileId::from_kernel(ino, dev))
    };
    let file = inode()?;
    let dir = inode()?;
    let dir2 = inode()?;
    let comm = comm_to_string(&r.take::<COMM_LEN>()?);
    let path = comm_to_string(&r.take::<PATH_LEN>()?);
    let path2 = comm_to_string(&r.take::<PATH_LEN>()?);
    Ok(FileRecord {
        op,
        tgid,
        pid,
        uid,
        gid,
        fd: (fd >= 0).then_some(fd),
        flags,
        dirfd: (dirfd != AT_FDCWD).then_some(dirfd),
        dirfd2: (dirfd2 != AT_FDCWD).then_some(dirfd2),
        now_ns,
        tx_start_ns: (tx_start_ns != 0).then_some(tx_start_ns),
        tail,
        file,
        dir,
        dir2,
        comm,
        path,
        path2: (!path2.is_empty()).then_some(path2),
    })
}

fn decode_tx(kind: EventKind, mut r: Reader<'_>) -> Result<TxRecord, DecodeError> {
    let size = match kind {
        EventKind::TxStart => TxStartEvent::SIZE,
        _ => TxEvent::SIZE,
    };
    if r.bytes.len() < size {
        return Err(DecodeError::Short(r.bytes.len()));
    }
    let audit = |v: u32| (v != UNSET).then_some(v);
    let mut record = TxRecord {
        kind,
        tgid: r.u32()?,
        pid: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
        ret: r.u32()? as i32,
        loginuid: audit(r.u32()?),
        sessionid: audit(r.u32()?),
        writes: r.u32()?,
        cookie: {
            let _pad = r.u32()?;
            r.u64()?
        },
        start_ns: r.u64()?,
        now_ns: r.u64()?,
        comm: comm_to_string(&r.take::<COMM_LEN>()?),
        ancestors: Vec::new(),
        cmdline: Vec::new(),
    };
    if kind == EventKind::TxStart {
        for _ in 0..MAX_ANCESTORS {
            let tgid = r.u32()?;
            let comm = comm_to_string(&r.take::<COMM_LEN>()?);
            if tgid != 0 {
                record.ancestors.push((tgid, comm));
            }
        }
        let len = (r.u32()? as usize).min(CMDLINE_LEN);
        let _pad = r.u32()?;
        let bytes = r.take::<CMDLINE_LEN>()?;
        record.cmdline = bytes[..len].to_vec();
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(e: &TxEvent) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [
            e.kind,
            e.tgid,
            e.pid,
            e.uid,
            e.gid,
            e.ret as u32,
            e.loginuid,
            e.sessionid,
            e.writes,
            0,
        ] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        for x in [e.cookie, e.start_ns, e.now_ns] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v.extend_from_slice(&e.comm);
        v
    }

    fn event(kind: EventKind) -> TxEvent {
        let mut comm = [0u8; COMM_LEN];
        comm[..3].copy_from_slice(b"rpm");
        TxEvent {
            kind: kind as u32,
            tgid: 42,
            pid: 43,
            uid: 1000,
            gid: 100,
            ret: -1,
            loginuid: 4242,
            sessionid: UNSET,
            writes: 3,
            _pad: 0,
            cookie: 7,
            start_ns: 5,
            now_ns: 9,
            comm,
        }
    }

    #[test]
    fn layout_matches_the_shared_struct() {
        assert_eq!(TxEvent::SIZE, 80);
        assert_eq!(std::mem::offset_of!(TxEvent, cookie), 40);
        assert_eq!(std::mem::offset_of!(TxEvent, comm), 64);
        assert_eq!(std::mem::offset_of!(TxStartEvent, ancestors), 80);
        assert_eq!(std::mem::offset_of!(TxStartEvent, cmdline_len), 240);
        assert_eq!(std::mem::offset_of!(TxStartEvent, cmdline), 248);
        assert_eq!(TxStartEvent::SIZE, 248 + CMDLINE_LEN);
        assert_eq!(FileEvent::SIZE, 640);
        assert_eq!(std::mem::offset_of!(FileEvent, now_ns), 40);
        assert_eq!(std::mem::offset_of!(FileEvent, tx_start_ns), 48);
        assert_eq!(std::mem::offset_of!(FileEvent, tail), 56);
        assert_eq!(std::mem::offset_of!(FileEvent, file), 64);
        assert_eq!(std::mem::offset_of!(FileEvent, dir2), 96);
        assert_eq!(std::mem::offset_of!(FileEvent, path), 128);
    }

    #[test]
    fn round_trip() {
        let BpfRecord::Tx(record) = decode(&encode(&event(EventKind::TxEnd))).unwrap() else {
            panic!("not a transaction record")
        };
        assert_eq!(record.kind, EventKind::TxEnd);
        assert_eq!((record.tgid, record.pid, record.ret), (42, 43, -1));
        assert_eq!((record.uid, record.gid, record.cookie), (1000, 100, 7));
        assert_eq!((record.loginuid, record.sessionid), (Some(4242), None));
        assert_eq!((record.start_ns, record.now_ns, record.writes), (5, 9, 3));
        assert_eq!(record.comm, "rpm");
        assert!(record.ancestors.is_empty() && record.cmdline.is_empty());
    }

    #[test]
    fn start_records_carry_parents_and_the_command_line() {
        let mut bytes = encode(&event(EventKind::TxStart));
        for (tgid, comm) in [(40u32, &b"bash"[..]), (30, b"sshd")] {
            bytes.extend_from_slice(&tgid.to_ne_bytes());
            let mut c = [0u8; COMM_LEN];
            c[..comm.len()].copy_from_slice(comm);
            bytes.extend_from_slice(&c);
        }
        bytes.extend_from_slice(&[0u8; (MAX_ANCESTORS - 2) * (4 + COMM_LEN)]);
        let argv = b"rpm\0-i\0x.rpm\0";
        bytes.extend_from_slice(&(argv.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        let mut cmdline = vec![0u8; CMDLINE_LEN];
        cmdline[..argv.len()].copy_from_slice(argv);
        bytes.extend_from_slice(&cmdline);
        assert_eq!(bytes.len(), TxStartEvent::SIZE);
        let BpfRecord::Tx(record) = decode(&bytes).unwrap() else {
            panic!("not a transaction record")
        };
        assert_eq!(
            record.ancestors,
            [(40, "bash".to_owned()), (30, "sshd".to_owned())]
        );
        assert_eq!(record.cmdline, argv);
        // A start record cut short is an error, not a guess.
        assert_eq!(
            decode(&bytes[..TxEvent::SIZE]),
            Err(DecodeError::Short(TxEvent::SIZE))
        );
    }

    #[test]
    fn file_record() {
        let mut bytes = Vec::new();
        for x in [
            EventKind::File as u32,
            FileOp::Rename as u32,
            10,
            11,
            0,
            0,
            u32::MAX,
            0,
            5,
            AT_FDCWD as u32,
        ] {
            bytes.extend_from_slice(&x.to_ne_bytes());
        }
        bytes.extend_from_slice(&77u64.to_ne_bytes());
        bytes.extend_from_slice(&0u64.to_ne_bytes());
        bytes.extend_from_slice(&0u64.to_ne_bytes()); // tail, pad
        // file unknown; dir = inode 99 on device 8:1; dir2 unknown.
        for (ino, dev) in [(0u64, 0u32), (99, (8 << 20) | 1), (0, 0)] {
            bytes.extend_from_slice(&ino.to_ne_bytes());
            bytes.extend_from_slice(&dev.to_ne_bytes());
            bytes.extend_from_slice(&0u32.to_ne_bytes());
        }
        let mut comm = [0u8; COMM_LEN];
        comm[..2].copy_from_slice(b"mv");
        bytes.extend_from_slice(&comm);
        let mut path = [0u8; PATH_LEN];
        path[..8].copy_from_slice(b"Packages");
        bytes.extend_from_slice(&path);
        bytes.extend_from_slice(&[0u8; PATH_LEN]);
        assert_eq!(bytes.len(), FileEvent::SIZE);
        let BpfRecord::File(record) = decode(&bytes).unwrap() else {
            panic!("not a file record")
        };
        assert_eq!(record.op, FileOp::Rename);
        assert_eq!((record.tgid, record.pid, record.fd), (10, 11, None));
        assert_eq!((record.dirfd, record.dirfd2), (Some(5), None));
        assert_eq!(record.tx_start_ns, None);
        assert_eq!(record.file, None);
        assert_eq!(
            record.dir,
            Some(FileId {
                dev: libc::makedev(8, 1),
                ino: 99
            })
        );
        assert_eq!(record.dir2, None);
        assert_eq!(
            (record.comm.as_str(), record.path.as_str()),
            ("mv", "Packages")
        );
        assert_eq!(record.path2, None);
        assert_eq!(decode(&bytes[..100]), Err(DecodeError::Short(100)));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert_eq!(decode(&[1, 0, 0]), Err(DecodeError::Short(3)));
        let mut bytes = vec![0u8; TxStartEvent::SIZE];
        bytes[0] = 99;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind(99)));
    }
}
