//! Decoding ring-buffer records into userspace types.
//!
//! Records are decoded field by field from bytes, not cast, so a short or unknown record is a
//! typed error rather than undefined behaviour.

use guestwatch_agent_common::{COMM_LEN, EventKind, FileEvent, FileOp, PATH_LEN, TxEvent};

/// A transaction boundary seen in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxRecord {
    pub kind: EventKind,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub ret: i32,
    pub cookie: u64,
    /// `CLOCK_BOOTTIME` ns; 0 when the start was not observed.
    pub start_ns: u64,
    /// `CLOCK_BOOTTIME` ns of the record.
    pub now_ns: u64,
    pub comm: String,
}

/// A file-level change by a process outside librpm (the tamper signal), as the kernel saw it.
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
    /// `CLOCK_BOOTTIME` ns of the record.
    pub now_ns: u64,
    pub comm: String,
    /// The path as the process passed it (may be relative), lossily UTF-8.
    pub path: String,
    /// The rename destination.
    pub path2: Option<String>,
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
        Some(kind @ (EventKind::TxStart | EventKind::TxEnd)) => {
            decode_tx(kind, r).map(BpfRecord::Tx)
        }
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
    let now_ns = r.u64()?;
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
        now_ns,
        comm,
        path,
        path2: (!path2.is_empty()).then_some(path2),
    })
}

fn decode_tx(kind: EventKind, mut r: Reader<'_>) -> Result<TxRecord, DecodeError> {
    if r.bytes.len() < TxEvent::SIZE {
        return Err(DecodeError::Short(r.bytes.len()));
    }
    Ok(TxRecord {
        kind,
        tgid: r.u32()?,
        pid: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
        ret: r.u32()? as i32,
        cookie: r.u64()?,
        start_ns: r.u64()?,
        now_ns: r.u64()?,
        comm: comm_to_string(&r.take::<COMM_LEN>()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(e: &TxEvent) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [e.kind, e.tgid, e.pid, e.uid, e.gid, e.ret as u32] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        for x in [e.cookie, e.start_ns, e.now_ns] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v.extend_from_slice(&e.comm);
        v
    }

    #[test]
    fn layout_matches_the_shared_struct() {
        assert_eq!(TxEvent::SIZE, 64);
        assert_eq!(std::mem::offset_of!(TxEvent, cookie), 24);
        assert_eq!(std::mem::offset_of!(TxEvent, comm), 48);
        assert_eq!(FileEvent::SIZE, 568);
        assert_eq!(std::mem::offset_of!(FileEvent, now_ns), 32);
        assert_eq!(std::mem::offset_of!(FileEvent, path), 56);
    }

    #[test]
    fn round_trip() {
        let mut comm = [0u8; COMM_LEN];
        comm[..3].copy_from_slice(b"rpm");
        let event = TxEvent {
            kind: EventKind::TxEnd as u32,
            tgid: 42,
            pid: 43,
            uid: 1000,
            gid: 100,
            ret: -1,
            cookie: 7,
            start_ns: 5,
            now_ns: 9,
            comm,
        };
        let BpfRecord::Tx(record) = decode(&encode(&event)).unwrap() else {
            panic!("not a transaction record")
        };
        assert_eq!(record.kind, EventKind::TxEnd);
        assert_eq!((record.tgid, record.pid, record.ret), (42, 43, -1));
        assert_eq!((record.uid, record.gid, record.cookie), (1000, 100, 7));
        assert_eq!((record.start_ns, record.now_ns), (5, 9));
        assert_eq!(record.comm, "rpm");
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
        ] {
            bytes.extend_from_slice(&x.to_ne_bytes());
        }
        bytes.extend_from_slice(&77u64.to_ne_bytes());
        let mut comm = [0u8; COMM_LEN];
        comm[..2].copy_from_slice(b"mv");
        bytes.extend_from_slice(&comm);
        let mut path = [0u8; PATH_LEN];
        path[..13].copy_from_slice(b"/var/lib/rpm/");
        bytes.extend_from_slice(&path);
        bytes.extend_from_slice(&[0u8; PATH_LEN]);
        assert_eq!(bytes.len(), FileEvent::SIZE);
        let BpfRecord::File(record) = decode(&bytes).unwrap() else {
            panic!("not a file record")
        };
        assert_eq!(record.op, FileOp::Rename);
        assert_eq!((record.tgid, record.pid, record.fd), (10, 11, None));
        assert_eq!(
            (record.comm.as_str(), record.path.as_str()),
            ("mv", "/var/lib/rpm/")
        );
        assert_eq!(record.path2, None);
        assert_eq!(decode(&bytes[..100]), Err(DecodeError::Short(100)));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert_eq!(decode(&[1, 0, 0]), Err(DecodeError::Short(3)));
        let mut bytes = vec![0u8; TxEvent::SIZE];
        bytes[0] = 99;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind(99)));
    }
}
