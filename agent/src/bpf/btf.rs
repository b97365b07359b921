//! Where task fields are, read from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The BPF programs read a few `task_struct` and `mm_struct` fields (audit login uid and
//! session, parents, command line) with `bpf_probe_read_kernel` at offsets this module finds,
//! because these kernels refuse BTF-enabled program types that would let the verifier resolve
//! them. Only what is needed of the BTF format is decoded: the type section's structs and
//! unions (descending into anonymous members, as `mm_struct` keeps its fields in one) and the
//! string section. Anything unexpected yields "not found", never a wrong offset.

use std::collections::HashMap;

use guestwatch_agent_common::{TaskOffsets, UNSET};

const MAGIC: u16 = 0xeb9f;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// A struct or union member: its name, type id and offset in bits.
#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
enum Type {
    /// Structs and unions with their members.
    Composite { members: Vec<Member> },
    /// Anything else: only its id matters (it may be a member's type).
    Other,
}

/// The structs and unions of a BTF blob.
pub struct Btf {
    /// Index = type id (0 is `void`).
    types: Vec<Type>,
    by_name: HashMap<String, u32>,
}

/// Why a BTF blob could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic)")]
    Magic,
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF type kind {0}")]
    Kind(u32),
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let b = self
            .bytes
            .get(self.at..self.at + 4)
            .ok_or(BtfError::Truncated(self.at))?;
        self.at += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        if self.at + n > self.bytes.len() {
            return Err(BtfError::Truncated(self.at));
        }
        self.at += n;
        Ok(())
    }
}

fn string_at(strings: &[u8], offset: u32) -> String {
    let start = offset as usize;
    let Some(rest) = strings.get(start..) else {
        return String::new();
    };
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> std::io::Result<Self> {
        let bytes = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Self::parse(&bytes).map_err(std::io::Error::other)
    }

    /// Decodes a little-endian BTF blob (the format of the running kernel on x86 and arm64).
    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        let mut head = Cursor { bytes, at: 0 };
        let first = head.u32()?;
        if first as u16 != MAGIC {
            return Err(BtfError::Magic);
        }
        let hdr_len = head.u32()? as usize;
        let type_off = head.u32()? as usize;
        let type_len = head.u32()? as usize;
        let str_off = head.u32()? as usize;
        let str_len = head.u32()? as usize;
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Truncated(off))?;
            let end = start.checked_add(len).ok_or(BtfError::Truncated(start))?;
            bytes.get(start..end).ok_or(BtfError::Truncated(start))
        };
        let type_bytes = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;

        let mut types = vec![Type::Other];
        let mut by_name = HashMap::new();
        let mut c = Cursor {
            bytes: type_bytes,
            at: 0,
        };
        while c.at < type_bytes.len() {
            let name_off = c.u32()?;
            let info = c.u32()?;
            let _size_or_type = c.u32()?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kflag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen.min(4096));
                    for _ in 0..vlen {
                        let name = string_at(strings, c.u32()?);
                        let type_id = c.u32()?;
                        let offset = c.u32()?;
                        // With kflag the top 8 bits are a bitfield's size.
                        let bit_offset = if kflag { offset & 0x00ff_ffff } else { offset };
                        members.push(Member {
                            name,
                            type_id,
                            bit_offset,
                        });
                    }
                    let name = string_at(strings, name_off);
                    if !name.is_empty() {
                        // The first definition wins (modules may repeat names; vmlinux does not).
                        by_name.entry(name).or_insert(types.len() as u32);
                    }
                    Type::Composite { members }
                }
                // int, var, decl_tag: 4 bytes.
                1 | 14 | 17 => {
                    c.skip(4)?;
                    Type::Other
                }
                // array.
                3 => {
                    c.skip(12)?;
                    Type::Other
                }
                // enum, func_proto: 8 bytes per entry.
                6 | 13 => {
                    c.skip(8 * vlen)?;
                    Type::Other
                }
                // datasec, enum64: 12 bytes per entry.
                15 | 19 => {
                    c.skip(12 * vlen)?;
                    Type::Other
                }
                // ptr, fwd, typedef, volatile, const, restrict, func, float, type_tag.
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => Type::Other,
                other => return Err(BtfError::Kind(other)),
            };
            types.push(ty);
        }
        Ok(Self { types, by_name })
    }

    /// The byte offset of `field` in struct `name`, looking through anonymous members.
    pub fn member_offset(&self, name: &str, field: &str) -> Option<u32> {
        let id = *self.by_name.get(name)?;
        self.find(id, field, 0)
    }

    fn find(&self, id: u32, field: &str, depth: u32) -> Option<u32> {
        // Kernel structs nest anonymous members a few levels at most.
        if depth > 8 {
            return None;
        }
        let Type::Composite { members, .. } = self.types.get(id as usize)? else {
            return None;
        };
        for m in members {
            if m.name == field {
                return (m.bit_offset % 8 == 0).then_some(m.bit_offset / 8);
            }
        }
        for m in members.iter().filter(|m| m.name.is_empty()) {
            if let Some(inner) = self.find(m.type_id, field, depth + 1) {
                return Some(m.bit_offset / 8 + inner);
            }
        }
        None
    }
}

/// The offsets the BPF programs need, from `btf`; each missing one stays [`UNSET`].
pub fn task_offsets(btf: &Btf) -> TaskOffsets {
    let at = |s: &str, f: &str| btf.member_offset(s, f).unwrap_or(UNSET);
    TaskOffsets {
        loginuid: at("task_struct", "loginuid"),
        sessionid: at("task_struct", "sessionid"),
        real_parent: at("task_struct", "real_parent"),
        tgid: at("task_struct", "tgid"),
        comm: at("task_struct", "comm"),
        mm: at("task_struct", "mm"),
        arg_start: at("mm_struct", "arg_start"),
        arg_end: at("mm_struct", "arg_end"),
        files: at("task_struct", "files"),
        fdt: at("files_struct", "fdt"),
        fdtable_fd: at("fdtable", "fd"),
        max_fds: at("fdtable", "max_fds"),
        f_inode: at("file", "f_inode"),
        i_ino: at("inode", "i_ino"),
        i_sb: at("inode", "i_sb"),
        s_dev: at("super_block", "s_dev"),
        fs: at("task_struct", "fs"),
        pwd_dentry: match (
            btf.member_offset("fs_struct", "pwd"),
            btf.member_offset("path", "dentry"),
        ) {
            (Some(pwd), Some(dentry)) => pwd + dentry,
            _ => UNSET,
        },
        d_inode: at("dentry", "d_inode"),
    }
}

/// The running kernel's offsets, or all [`UNSET`] (with the reason logged) without BTF.
pub fn kernel_task_offsets() -> TaskOffsets {
    match Btf::from_kernel() {
        Ok(btf) => {
            let offsets = task_offsets(&btf);
            if offsets.loginuid == UNSET {
                log::info!(
                    "this kernel's task_struct has no audit fields (CONFIG_AUDIT off): loginuid and sessionid come from /proc"
                );
            }
            offsets
        }
        Err(e) => {
            log::warn!(
                "no kernel BTF ({e}): loginuid, sessionid, parents and command lines of transactions come from /proc"
            );
            TaskOffsets::UNKNOWN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with: 1 int, 2 struct inner { int a; int b; }, 3 struct outer { int x;
    /// <anon inner at 64 bits>; int y at 128 bits }, 4 a ptr.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0outer\0x\0y\0";
        let s = |name: &str| {
            let pos = strings
                .windows(name.len() + 1)
                .position(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
                .unwrap();
            pos as u32
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                t.extend_from_slice(&w.to_le_bytes());
            }
        };
        push(&[s("int"), 1 << 24, 4, 32]);
        push(&[s("inner"), (4 << 24) | 2, 8]);
        push(&[s("a"), 1, 0, s("b"), 1, 32]);
        push(&[s("outer"), (4 << 24) | 3, 20]);
        push(&[s("x"), 1, 0, 0, 2, 64, s("y"), 1, 128]);
        push(&[0, 2 << 24, 1]);
        let mut out = Vec::new();
        out.extend_from_slice(&(MAGIC as u32 | (1 << 16)).to_le_bytes());
        for w in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn offsets_through_anonymous_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("outer", "x"), Some(0));
        assert_eq!(btf.member_offset("outer", "b"), Some(12));
        assert_eq!(btf.member_offset("outer", "y"), Some(16));
        assert_eq!(btf.member_offset("inner", "a"), Some(0));
        assert_eq!(btf.member_offset("outer", "missing"), None);
        assert_eq!(btf.member_offset("nothing", "x"), None);
    }

    #[test]
    fn damaged_blobs_are_errors_not_panics() {
        let good = blob();
        assert_eq!(Btf::parse(&good[..3]).err(), Some(BtfError::Truncated(0)));
        for cut in 4..good.len() {
            let _ = Btf::parse(&good[..cut]);
        }
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(Btf::parse(&bad).err(), Some(BtfError::Magic));
    }

    #[test]
    fn the_running_kernel_has_the_task_fields() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("SKIPPED: no /sys/kernel/btf/vmlinux on this kernel");
            return;
        };
        let o = task_offsets(&btf);
        for (name, value) in [
            ("files", o.files),
            ("fdt", o.fdt),
            ("fdtable_fd", o.fdtable_fd),
            ("max_fds", o.max_fds),
            ("f_inode", o.f_inode),
            ("i_ino", o.i_ino),
            ("i_sb", o.i_sb),
            ("s_dev", o.s_dev),
            ("fs", o.fs),
            ("pwd_dentry", o.pwd_dentry),
            ("d_inode", o.d_inode),
            ("real_parent", o.real_parent),
            ("tgid", o.tgid),
            ("comm", o.comm),
            ("mm", o.mm),
            ("arg_start", o.arg_start),
            ("arg_end", o.arg_end),
        ] {
            assert_ne!(value, UNSET, "{name} not found");
        }
        assert_eq!(o.arg_end, o.arg_start + 8, "arg_end follows arg_start");
    }
}
