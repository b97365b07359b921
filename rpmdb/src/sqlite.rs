//! SQLite databases (`rpmdb.sqlite`): Fedora 33+, RHEL 9+, Amazon Linux 2023, Mariner.
//!
//! Opened strictly read-only: the connection never creates, truncates or deletes the `-wal` or
//! `-shm` files, and committed WAL content is visible, as `rpm -qa` sees it. A database locked
//! by a running transaction is retried for a short while before it is reported.

use std::{path::Path, time::Duration};

use rusqlite::{Connection, OpenFlags};

use crate::{DbError, EntryError, header};

/// How long a locked database is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

type Read = (Vec<crate::Package>, Vec<EntryError>);

/// Attempts at a consistent immutable read before falling back to a private copy.
const IMMUTABLE_ATTEMPTS: usize = 5;

fn sidecar(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// `file:` URI for `path` (percent-encoding what URIs reserve).
fn uri(path: &Path, query: &str) -> String {
    let mut out = String::from("file:");
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                out.push(*b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out.push('?');
    out.push_str(query);
    out
}

/// What identifies the database's state on disk: if it changed during a read, the read may be
/// torn and is repeated.
fn fingerprint(path: &Path) -> Option<(u64, std::time::SystemTime, bool)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.len(),
        meta.modified().ok()?,
        sidecar(path, "-wal").exists(),
    ))
}

/// Reads every header. SQLite's read-only mode still creates `-wal`/`-shm` next to a WAL
/// database when they are missing, so:
/// - with both present (a writer has the database open, or left them), read through them;
/// - with no `-wal` there is no uncommitted state to see: read the file as immutable (nothing is
///   created) and check nothing changed meanwhile, retrying a few times;
/// - with a `-wal` but no `-shm` (a crashed writer), or when it keeps changing, read a private
///   copy of the database and its WAL in a temporary directory.
pub fn read(path: &Path) -> Result<Read, DbError> {
    with_snapshot(path, read_packages)
}

/// Runs `read` on a strictly read-only connection to the SQLite database at `path` that sees
/// its committed content (WAL included) and creates nothing next to it (see [`read`]). Also
/// used for other SQLite files of a system, such as dnf's history.
pub fn with_snapshot<T>(
    path: &Path,
    read: impl Fn(&Path, &Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let wal = sidecar(path, "-wal");
    let shm = sidecar(path, "-shm");
    if wal.exists() && shm.exists() {
        return read_uri(path, &uri(path, "mode=ro"), &read);
    }
    if !wal.exists() {
        for _ in 0..IMMUTABLE_ATTEMPTS {
            let before = fingerprint(path);
            let result = read_uri(path, &uri(path, "mode=ro&immutable=1"), &read);
            if before.is_some() && before == fingerprint(path) {
                return result;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    read_copy(path, &read)
}

fn read_copy<T>(
    path: &Path,
    read: &impl Fn(&Path, &Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let io = |source| DbError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = tempfile::tempdir().map_err(io)?;
    let copy = dir.path().join("rpmdb.sqlite");
    std::fs::copy(path, &copy).map_err(io)?;
    let wal = sidecar(path, "-wal");
    if wal.exists() {
        std::fs::copy(&wal, sidecar(&copy, "-wal")).map_err(io)?;
    }
    read_uri(path, &uri(&copy, "mode=ro"), read).map_err(|e| match e {
        DbError::Sqlite { reason, .. } => DbError::Sqlite {
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    })
}

fn read_uri<T>(
    path: &Path,
    uri: &str,
    read: &impl Fn(&Path, &Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let err = |reason: String| DbError::Sqlite {
        path: path.to_path_buf(),
        reason,
    };
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| classify(path, e.to_string()))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| err(e.to_string()))?;
    // Every page is read once, in order: a small page cache is enough (SQLite's default is 2 MiB).
    conn.pragma_update(None, "cache_size", -256)
        .map_err(|e| err(e.to_string()))?;
    read(path, &conn)
}

fn read_packages(path: &Path, conn: &Connection) -> Result<Read, DbError> {
    let err = |reason: String| DbError::Sqlite {
        path: path.to_path_buf(),
        reason,
    };
    // One read transaction: a consistent snapshot even while rpm writes.
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| err(e.to_string()))?;
    let mut stmt = tx
        .prepare("SELECT hnum, blob FROM Packages ORDER BY hnum")
        .map_err(|e| classify(path, e.to_string()))?;
    let mut rows = stmt.query([]).map_err(|e| err(e.to_string()))?;
    let mut packages = Vec::new();
    let mut errors = Vec::new();
    loop {
        let row = match rows.next() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => return Err(classify(path, e.to_string())),
        };
        let hnum: i64 = row.get(0).unwrap_or(-1);
        let blob = match row.get_ref(1) {
            Ok(rusqlite::types::ValueRef::Blob(b)) => b,
            _ => {
                errors.push(EntryError {
                    entry: format!("hnum {hnum}"),
                    reason: "blob is not a BLOB".into(),
                });
                continue;
            }
        };
        match header::package(blob) {
            Ok(p) => packages.push(p),
            Err(e) => errors.push(EntryError {
                entry: format!("hnum {hnum}"),
                reason: e.to_string(),
            }),
        }
    }
    Ok((packages, errors))
}

fn classify(path: &Path, text: String) -> DbError {
    let path = path.to_path_buf();
    if text.contains("no such table") || text.contains("no such column") {
        DbError::BadSchema { path, reason: text }
    } else if text.contains("locked") || text.contains("busy") {
        DbError::Locked { path }
    } else if text.contains("not a database") || text.contains("malformed") {
        DbError::NotRpmDb { path, reason: text }
    } else {
        DbError::Sqlite { path, reason: text }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_escape_reserved_bytes() {
        assert_eq!(
            uri(Path::new("/a b/rpm?x#y%"), "mode=ro"),
            "file:/a%20b/rpm%3Fx%23y%25?mode=ro"
        );
    }
}
