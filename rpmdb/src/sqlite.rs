//! SQLite databases (`rpmdb.sqlite`): Fedora 33+, RHEL 9+, Amazon Linux 2023, Mariner.
//!
//! Opened strictly read-only: the connection never creates, truncates or deletes the `-wal` or
//! `-shm` files, and committed WAL content is visible, as `rpm -qa` sees it. A database locked
//! by a running transaction is retried for a short while before it is reported.
//!
//! The file is hostile, and SQLite runs what its schema says, so every connection is opened
//! defensively ([`open_hardened`]): `SQLITE_DBCONFIG_DEFENSIVE`, untrusted schema, no views,
//! triggers or attached databases, low limits, and a progress handler that enforces the
//! deadline. SQLite opens files by path, so it gets the real path of the confined directory
//! with `SQLITE_OPEN_NOFOLLOW`, and the files it opened are checked to be the ones resolved.

use std::{
    collections::HashSet,
    path::Path,
    time::{Duration, Instant},
};

use rusqlite::{Connection, OpenFlags, config::DbConfig, limits::Limit};

use crate::{
    DbError, Decoded, EntryError, ReadOptions,
    confine::{self, Dir, FileId, Opened, Stamp},
};

/// How long a locked database is retried (less when the deadline is nearer).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts at a consistent immutable read before falling back to a private copy.
const IMMUTABLE_ATTEMPTS: usize = 5;

/// SQLite's virtual machine instructions between two looks at the deadline.
const PROGRESS_STEPS: i32 = 1000;

/// Limits of a connection, beside the value length (`ReadOptions::max_header_bytes`). rpm's
/// and dnf's schemas are a few short statements over tables of a few columns, and our queries
/// are fixed: anything near these numbers is not one of theirs.
const LIMITS: &[(Limit, i32)] = &[
    (Limit::SQLITE_LIMIT_SQL_LENGTH, 100_000),
    (Limit::SQLITE_LIMIT_COLUMN, 128),
    (Limit::SQLITE_LIMIT_EXPR_DEPTH, 100),
    (Limit::SQLITE_LIMIT_COMPOUND_SELECT, 8),
    (Limit::SQLITE_LIMIT_VDBE_OP, 25_000),
    (Limit::SQLITE_LIMIT_FUNCTION_ARG, 8),
    (Limit::SQLITE_LIMIT_ATTACHED, 0),
    (Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 100),
    (Limit::SQLITE_LIMIT_VARIABLE_NUMBER, 16),
    (Limit::SQLITE_LIMIT_TRIGGER_DEPTH, 1),
    (Limit::SQLITE_LIMIT_WORKER_THREADS, 0),
];

/// Whatever a schema could make SQLite run besides plain table reads is off.
const CONFIG: &[(DbConfig, bool)] = &[
    (DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true),
    (DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false),
    (DbConfig::SQLITE_DBCONFIG_ENABLE_VIEW, false),
    (DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false),
    (DbConfig::SQLITE_DBCONFIG_ENABLE_FKEY, false),
];

fn sidecar(name: &str, suffix: &str) -> String {
    format!("{name}{suffix}")
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

/// The database entry's state and whether a `-wal` is there: if either changed during an
/// immutable read, the read may be torn and is repeated.
fn fingerprint(dir: &Dir, name: &str) -> Option<(Stamp, bool)> {
    let db = dir.checked_entry(name).ok()??;
    let wal = dir.entry(&sidecar(name, "-wal")).ok()?.is_some();
    Some((db, wal))
}

/// Reads every header of the database `name` in `dir`, already opened as `file`.
/// `fresh` gives each attempt at a consistent read its own start.
pub(crate) fn read<'r>(
    dir: &Dir,
    name: &str,
    file: &Opened,
    options: &ReadOptions,
    fresh: &dyn Fn() -> Decoded<'r>,
) -> Result<Decoded<'r>, DbError> {
    snapshot(dir, name, file, options, &|path, conn| {
        read_packages(path, conn, options, fresh())
    })
}

/// Runs `read` on a hardened, strictly read-only connection to the SQLite database `name` in
/// `dir` that sees its committed content (WAL included) and creates nothing next to it, inside
/// one read transaction. Also used for other SQLite files of a system, such as dnf's history.
///
/// SQLite's read-only mode still creates `-wal`/`-shm` next to a WAL database when they are
/// missing, so:
/// - with both present (a writer has the database open, or left them), read through them;
/// - with no `-wal` there is no uncommitted state to see: read the file as immutable (nothing is
///   created) and check nothing changed meanwhile, retrying a few times;
/// - with a `-wal` but no `-shm` (a crashed writer), or when it keeps changing, read a private
///   copy of the database and its WAL, copied through the checked descriptors.
pub fn with_snapshot<T>(
    dir: &Dir,
    name: &str,
    options: &ReadOptions,
    read: impl Fn(&Path, &Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let file = dir.open_file(name)?;
    snapshot(dir, name, &file, options, &read)
}

/// The identities SQLite's descriptors must have.
struct Expect {
    db: FileId,
    wal: Option<FileId>,
    shm: Option<FileId>,
}

fn snapshot<T>(
    dir: &Dir,
    name: &str,
    file: &Opened,
    options: &ReadOptions,
    read: &dyn Fn(&Path, &Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let shown = file.path();
    options.check(shown)?;
    // A -wal or -shm that is a link, a fifo or a hard link is refused like the database.
    let wal = dir.checked_entry(&sidecar(name, "-wal"))?;
    let shm = dir.checked_entry(&sidecar(name, "-shm"))?;
    let real = dir.real_path()?.join(name);
    if let (Some(wal), Some(shm)) = (wal, shm) {
        let expect = Expect {
            db: file.stamp().id,
            wal: Some(wal.id),
            shm: Some(shm.id),
        };
        return read_verified(shown, &real, "mode=ro", &expect, options, read);
    }
    if wal.is_none() {
        let expect = Expect {
            db: file.stamp().id,
            wal: None,
            shm: None,
        };
        for _ in 0..IMMUTABLE_ATTEMPTS {
            let before = fingerprint(dir, name);
            let result = read_verified(shown, &real, "mode=ro&immutable=1", &expect, options, read);
            if matches!(result, Err(DbError::Deadline { .. })) {
                return result;
            }
            if before.is_some_and(|(db, _)| db.id == expect.db) && before == fingerprint(dir, name)
            {
                return result;
            }
            options.check(shown)?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    read_copy(dir, name, file, options, read)
}

fn read_copy<T>(
    dir: &Dir,
    name: &str,
    file: &Opened,
    options: &ReadOptions,
    read: &dyn Fn(&Path, &Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let shown = file.path();
    let io = |source| DbError::Io {
        path: shown.to_path_buf(),
        source,
    };
    let tmp = tempfile::tempdir().map_err(io)?;
    let copy = tmp.path().join("rpmdb.sqlite");
    file.copy_to(&mut std::fs::File::create_new(&copy).map_err(io)?)?;
    let wal = sidecar(name, "-wal");
    if dir.checked_entry(&wal)?.is_some() {
        let wal = dir.open_file(&wal)?;
        let mut to = std::fs::File::create_new(tmp.path().join("rpmdb.sqlite-wal")).map_err(io)?;
        wal.copy_to(&mut to)?;
    }
    // Our own temporary directory: nothing to verify, the same defences otherwise.
    let conn = open_hardened(shown, &uri(&copy, "mode=ro"), options)?;
    in_transaction(shown, &conn, options, |conn| read(shown, conn))
}

/// Opens `real` through SQLite, checks that the files SQLite opened are the ones resolved
/// (`expect`), and runs `read` in one read transaction.
fn read_verified<T>(
    shown: &Path,
    real: &Path,
    query: &str,
    expect: &Expect,
    options: &ReadOptions,
    read: &dyn Fn(&Path, &Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let ours: HashSet<String> = confine::open_descriptors(real)
        .into_iter()
        .map(|(fd, _)| fd)
        .collect();
    let conn = open_hardened(shown, &uri(real, query), options)?;
    in_transaction(shown, &conn, options, |conn| {
        // The first read opens the WAL and its index, if SQLite uses them.
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
            .map_err(|e| classify(shown, e, options))?;
        verify(shown, real, &ours, expect)?;
        read(shown, conn)
    })
}

/// Every descriptor of this process on `real` (and its `-wal`, `-shm`) must be the resolved
/// file, and SQLite must have opened the database itself.
fn verify(
    shown: &Path,
    real: &Path,
    ours: &HashSet<String>,
    expect: &Expect,
) -> Result<(), DbError> {
    let replaced = || DbError::Replaced {
        path: shown.to_path_buf(),
    };
    let db = confine::open_descriptors(real);
    if !db.iter().any(|(fd, _)| !ours.contains(fd)) {
        return Err(DbError::Sqlite {
            path: shown.to_path_buf(),
            reason: "cannot see the file SQLite opened (is /proc mounted?)".into(),
        });
    }
    if db.iter().any(|(_, id)| *id != Some(expect.db)) {
        return Err(replaced());
    }
    for (suffix, want) in [("-wal", expect.wal), ("-shm", expect.shm)] {
        let mut side = real.as_os_str().to_owned();
        side.push(suffix);
        let fds = confine::open_descriptors(Path::new(&side));
        if fds.iter().any(|(_, id)| want.is_none() || *id != want) {
            return Err(replaced());
        }
    }
    Ok(())
}

fn in_transaction<T>(
    shown: &Path,
    conn: &Connection,
    options: &ReadOptions,
    read: impl FnOnce(&Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    // One read transaction: a consistent snapshot even while rpm writes.
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| classify(shown, e, options))?;
    let out = read(&tx)?;
    // Only read: ending it cannot lose anything, and its error says nothing about the data.
    let _ = tx.rollback();
    Ok(out)
}

/// Opens a strictly read-only connection to `uri` with every defence on.
pub(crate) fn open_hardened(
    shown: &Path,
    uri: &str,
    options: &ReadOptions,
) -> Result<Connection, DbError> {
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .map_err(|e| classify(shown, e, options))?;
    harden(shown, &conn, options)?;
    Ok(conn)
}

/// The defences of [`open_hardened`], on an open connection.
fn harden(shown: &Path, conn: &Connection, options: &ReadOptions) -> Result<(), DbError> {
    let err = |e| classify(shown, e, options);
    for (config, on) in CONFIG {
        conn.set_db_config(*config, *on).map_err(err)?;
    }
    conn.pragma_update(None, "trusted_schema", false)
        .map_err(err)?;
    let length = i32::try_from(options.max_header_bytes).unwrap_or(i32::MAX);
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, length.max(1024))
        .map_err(err)?;
    for (limit, value) in LIMITS {
        conn.set_limit(*limit, *value).map_err(err)?;
    }
    let busy = match options.deadline {
        Some(deadline) => BUSY_TIMEOUT.min(deadline.saturating_duration_since(Instant::now())),
        None => BUSY_TIMEOUT,
    };
    conn.busy_timeout(busy).map_err(err)?;
    if let Some(deadline) = options.deadline {
        // Returning true interrupts the statement (SQLITE_INTERRUPT).
        conn.progress_handler(PROGRESS_STEPS, Some(move || Instant::now() >= deadline));
    }
    // Every page is read once, in order: a small page cache is enough (SQLite's default is 2 MiB).
    conn.pragma_update(None, "cache_size", -256).map_err(err)?;
    Ok(())
}

/// What [`require_table`] found of one column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The declared type, as written.
    pub decl_type: String,
    /// Position in the primary key (0: not in it).
    pub pk: i64,
}

/// Requires `table` to be an ordinary table of the main database — not missing, not a view,
/// not a virtual table — that has every column of `columns` as a stored column (not generated,
/// not hidden). Returns those columns.
pub fn require_table(
    conn: &Connection,
    shown: &Path,
    table: &str,
    columns: &[&str],
    options: &ReadOptions,
) -> Result<Vec<Column>, DbError> {
    let bad = |reason: String| DbError::BadSchema {
        path: shown.to_path_buf(),
        reason,
    };
    let err = |e| classify(shown, e, options);
    // What the file says about the name, before SQLite is asked to use it.
    let mut stmt = conn
        .prepare(
            "SELECT type, rootpage FROM main.sqlite_schema
             WHERE name = ?1 COLLATE NOCASE AND type IN ('table', 'view')",
        )
        .map_err(err)?;
    let found: Vec<(String, i64)> = stmt
        .query_map([table], |row| {
            Ok((
                row.get::<_, String>(0).unwrap_or_default(),
                row.get::<_, i64>(1).unwrap_or(0),
            ))
        })
        .map_err(err)?
        .collect::<Result<_, _>>()
        .map_err(err)?;
    match found.as_slice() {
        [] => return Err(bad(format!("no such table: {table}"))),
        [(kind, _)] if kind == "view" => return Err(bad(format!("{table} is a view"))),
        // Views, triggers and virtual tables have no b-tree of their own.
        [(_, 0)] => return Err(bad(format!("{table} is a virtual table"))),
        [_] => {}
        _ => return Err(bad(format!("{table} is defined more than once"))),
    }
    // And what SQLite made of it (a crafted file can give a virtual table a root page).
    let kind: String = conn
        .query_row(
            "SELECT type FROM pragma_table_list(?1) WHERE schema = 'main'",
            [table],
            |row| row.get(0),
        )
        .map_err(err)?;
    if kind != "table" {
        return Err(bad(format!(
            "{table} is a {kind} table, not an ordinary one"
        )));
    }
    let mut stmt = conn
        .prepare("SELECT name, type, pk, hidden FROM pragma_table_xinfo(?1, 'main')")
        .map_err(err)?;
    let all: Vec<(String, String, i64, i64)> = stmt
        .query_map([table], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1).unwrap_or_default(),
                row.get::<_, i64>(2).unwrap_or(0),
                row.get::<_, i64>(3).unwrap_or(0),
            ))
        })
        .map_err(err)?
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let mut out = Vec::with_capacity(columns.len());
    for want in columns {
        let Some((name, decl_type, pk, hidden)) =
            all.iter().find(|(n, ..)| n.eq_ignore_ascii_case(want))
        else {
            return Err(bad(format!("no such column: {table}.{want}")));
        };
        if *hidden != 0 {
            return Err(bad(format!(
                "{table}.{want} is a generated or hidden column"
            )));
        }
        out.push(Column {
            name: name.clone(),
            decl_type: decl_type.clone(),
            pk: *pk,
        });
    }
    Ok(out)
}

fn read_packages<'r>(
    path: &Path,
    conn: &Connection,
    options: &ReadOptions,
    mut out: Decoded<'r>,
) -> Result<Decoded<'r>, DbError> {
    let columns = require_table(conn, path, "Packages", &["hnum", "blob"], options)?;
    let hnum = &columns[0];
    if hnum.pk != 1 || !hnum.decl_type.eq_ignore_ascii_case("INTEGER") {
        return Err(DbError::BadSchema {
            path: path.to_path_buf(),
            reason: "Packages.hnum is not an INTEGER PRIMARY KEY".into(),
        });
    }
    let err = |e| classify(path, e, options);
    // typeof() and length() of a blob do not load it: a blob over the limit is never read.
    let mut stmt = conn
        .prepare(
            "SELECT hnum, typeof(blob),
                    CASE WHEN typeof(blob) = 'blob' THEN length(blob) END,
                    CASE WHEN typeof(blob) = 'blob' AND length(blob) <= ?1 THEN blob END
             FROM Packages ORDER BY hnum",
        )
        .map_err(err)?;
    let max = i64::try_from(options.max_header_bytes).unwrap_or(i64::MAX);
    let mut rows = stmt.query([max]).map_err(err)?;
    loop {
        let row = match rows.next() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => return Err(err(e)),
        };
        options.check(path)?;
        let hnum: i64 = row.get(0).unwrap_or(-1);
        let entry = || format!("hnum {hnum}");
        let blob = match (row.get_ref(1), row.get_ref(3)) {
            (_, Ok(rusqlite::types::ValueRef::Blob(b))) => b,
            (Ok(rusqlite::types::ValueRef::Text(b"blob")), _) => {
                let len: i64 = row.get(2).unwrap_or(-1);
                out.errors.push(EntryError {
                    entry: entry(),
                    reason: format!(
                        "blob of {len} bytes, more than the {max} a header may have (not read)"
                    ),
                });
                continue;
            }
            _ => {
                out.errors.push(EntryError {
                    entry: entry(),
                    reason: "blob is not a BLOB".into(),
                });
                continue;
            }
        };
        out.bytes_decoded += blob.len() as u64;
        out.keep(options, entry, blob);
        // hnum is an INTEGER PRIMARY KEY: a rowid, unique in the table.
        if let Err(e) = out.header(hnum as u64, blob) {
            out.errors.push(EntryError {
                entry: entry(),
                reason: e.to_string(),
            });
        }
    }
    Ok(out)
}

/// Maps an SQLite error to what it means for the caller.
pub fn classify(path: &Path, e: rusqlite::Error, options: &ReadOptions) -> DbError {
    use rusqlite::ErrorCode as C;
    let path = path.to_path_buf();
    let text = e.to_string();
    let code = e.sqlite_error();
    match code.map(|c| (c.code, c.extended_code)) {
        Some((C::OperationInterrupted, _)) if options.expired() => DbError::Deadline { path },
        Some((C::TooBig, _)) => DbError::Limit { path, reason: text },
        Some((C::DatabaseBusy | C::DatabaseLocked, _)) => DbError::Locked { path },
        Some((C::NotADatabase | C::DatabaseCorrupt, _)) => DbError::NotRpmDb { path, reason: text },
        // SQLITE_CANTOPEN_SYMLINK: a link appeared on the path after it was resolved.
        Some((C::CannotOpen, 1550)) => DbError::Replaced { path },
        _ if text.contains("no such table") || text.contains("no such column") => {
            DbError::BadSchema { path, reason: text }
        }
        _ if text.contains("malformed") => DbError::NotRpmDb { path, reason: text },
        _ => DbError::Sqlite { path, reason: text },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sqlite_opened_that_is_not_the_one_resolved_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        rusqlite::Connection::open(tmp.path().join("x.sqlite"))
            .unwrap()
            .execute_batch("CREATE TABLE t (a)")
            .unwrap();
        let dir = Dir::open_plain(tmp.path()).unwrap();
        let file = dir.open_file("x.sqlite").unwrap();
        let real = dir.real_path().unwrap().join("x.sqlite");
        let options = ReadOptions::default();
        let ok = |_: &Path, _: &Connection| Ok(());
        let right = Expect {
            db: file.stamp().id,
            wal: None,
            shm: None,
        };
        read_verified(
            file.path(),
            &real,
            "mode=ro&immutable=1",
            &right,
            &options,
            &ok,
        )
        .unwrap();
        // As if the name had been swapped for another file between resolution and SQLite's open.
        let wrong = Expect {
            db: FileId { dev: 0, ino: 0 },
            ..right
        };
        let result = read_verified(
            file.path(),
            &real,
            "mode=ro&immutable=1",
            &wrong,
            &options,
            &ok,
        );
        assert!(
            matches!(result, Err(DbError::Replaced { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn uris_escape_reserved_bytes() {
        assert_eq!(
            uri(Path::new("/a b/rpm?x#y%"), "mode=ro"),
            "file:/a%20b/rpm%3Fx%23y%25?mode=ro"
        );
    }
}
