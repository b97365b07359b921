//! Databases crafted to make the reader hang, run the schema's code, or allocate without end:
//! each ends quickly with a typed error or reads what is really there. And the deadline: every
//! backend stops when it passes.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rpmdb::{BytesError, DbError, ReadOptions, Source};
use rusqlite::Connection;
use tempfile::TempDir;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/rpmdb")
        .join(rel)
}

/// A database directory whose `rpmdb.sqlite` is made by `sql`, run with the real mariner
/// database attached as `src` (129 real headers to copy from).
fn crafted(sql: &str) -> TempDir {
    let dir = TempDir::new().unwrap();
    let c = Connection::open(dir.path().join("rpmdb.sqlite")).unwrap();
    c.execute(
        "ATTACH ?1 AS src",
        [format!(
            "file:{}?immutable=1",
            fixture("go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite").display()
        )],
    )
    .unwrap();
    c.execute_batch(sql).unwrap();
    drop(c);
    dir
}

fn read(dir: &TempDir, options: &ReadOptions) -> (Result<rpmdb::Scan, DbError>, Duration) {
    let started = Instant::now();
    let result = rpmdb::read_with(Source::Path(dir.path()), options);
    (result, started.elapsed())
}

fn fast(d: Duration) {
    assert!(d < Duration::from_secs(3), "took {d:?}");
}

#[test]
fn packages_as_a_never_ending_view_is_refused_at_once() {
    let db = crafted(
        "CREATE VIEW Packages AS WITH RECURSIVE c(hnum, blob) AS
           (SELECT 1, x'00' UNION ALL SELECT hnum + 1, blob FROM c) SELECT hnum, blob FROM c;",
    );
    // Even with no deadline at all: the view is never run.
    let (result, took) = read(&db, &ReadOptions::default());
    fast(took);
    assert!(
        matches!(&result, Err(DbError::BadSchema { reason, .. }) if reason.contains("view")),
        "{result:?}"
    );
}

#[test]
fn a_never_ending_query_is_stopped_by_a_200ms_deadline() {
    // What a view like the one above would do if it ran: the progress handler interrupts it.
    let db = crafted("CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, blob BLOB);");
    let dir = rpmdb::confine::Dir::open_plain(db.path()).unwrap();
    let options = ReadOptions::timeout(Duration::from_millis(200));
    let started = Instant::now();
    let result = rpmdb::sqlite::with_snapshot(&dir, "rpmdb.sqlite", &options, |_, conn| {
        conn.query_row(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
            [],
            |row| row.get::<_, i64>(0),
        )
        .map_err(|e| rpmdb::sqlite::classify(Path::new("q"), e, &options))
    });
    let took = started.elapsed();
    assert!(
        matches!(result, Err(DbError::Deadline { .. })),
        "{result:?}"
    );
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn a_passed_deadline_stops_every_backend() {
    let passed = ReadOptions {
        deadline: Some(Instant::now()),
        ..ReadOptions::default()
    };
    for rel in [
        "go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite",
        "go-rpmdb_libuuid/Packages",
        "go-rpmdb_sle15-bci/Packages.db",
    ] {
        let result = rpmdb::read_with(Source::Path(&fixture(rel)), &passed);
        assert!(
            matches!(result, Err(DbError::Deadline { .. })),
            "{rel}: {result:?}"
        );
    }
    // Inside the Berkeley DB and NDB loops, not only before them.
    let bdb = std::fs::read(fixture("go-rpmdb_libuuid/Packages")).unwrap();
    assert_eq!(
        rpmdb::bdb::read_bytes_with(&bdb, &passed).err(),
        Some(BytesError::Deadline)
    );
    let ndb = std::fs::read(fixture("go-rpmdb_sle15-bci/Packages.db")).unwrap();
    assert_eq!(
        rpmdb::ndb::read_bytes_with(&ndb, &passed).err(),
        Some(BytesError::Deadline)
    );
    // And the same bytes read in full without one.
    assert_eq!(
        rpmdb::ndb::read_bytes_with(&ndb, &ReadOptions::default())
            .unwrap()
            .packages
            .len(),
        35
    );
}

#[test]
fn virtual_tables_are_refused() {
    for (what, sql) in [
        (
            "fts5",
            "CREATE VIRTUAL TABLE Packages USING fts5(hnum, blob);",
        ),
        (
            "rtree",
            "CREATE VIRTUAL TABLE Packages USING rtree(hnum, blob, x);",
        ),
        (
            "unknown module",
            "CREATE VIRTUAL TABLE Packages USING fts5(hnum, blob);
             PRAGMA writable_schema = ON;
             UPDATE sqlite_schema SET sql = 'CREATE VIRTUAL TABLE Packages USING nosuch(hnum, blob)'
               WHERE name = 'Packages';",
        ),
    ] {
        let db = crafted(sql);
        let (result, took) = read(&db, &ReadOptions::default());
        fast(took);
        assert!(
            matches!(&result, Err(DbError::BadSchema { reason, .. }) if reason.contains("virtual")),
            "{what}: {result:?}"
        );
    }
    // A virtual table whose schema row claims a root page: SQLite's own view of it decides.
    let db = crafted(
        "CREATE VIRTUAL TABLE Packages USING fts5(hnum, blob);
         PRAGMA writable_schema = ON;
         UPDATE sqlite_schema SET rootpage = 2 WHERE name = 'Packages';",
    );
    let (result, took) = read(&db, &ReadOptions::default());
    fast(took);
    assert!(
        matches!(
            &result,
            Err(DbError::BadSchema { .. }) | Err(DbError::NotRpmDb { .. })
        ),
        "{result:?}"
    );
}

#[test]
fn wrong_columns_are_refused() {
    for (what, sql) in [
        (
            "generated blob",
            "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, raw BLOB,
               blob BLOB AS (zeroblob(200000000)));",
        ),
        (
            "text hnum",
            "CREATE TABLE Packages (hnum TEXT PRIMARY KEY, blob BLOB);",
        ),
        (
            "hnum not the key",
            "CREATE TABLE Packages (id INTEGER PRIMARY KEY, hnum INTEGER, blob BLOB);",
        ),
        (
            "no blob",
            "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, b BLOB);",
        ),
    ] {
        let db = crafted(sql);
        let (result, took) = read(&db, &ReadOptions::default());
        fast(took);
        assert!(
            matches!(result, Err(DbError::BadSchema { .. })),
            "{what}: {result:?}"
        );
    }
}

#[test]
fn triggers_and_odd_but_real_tables_read_what_is_there() {
    // Triggers never fire on a read; a WITHOUT ROWID table, an index on an expression and extra
    // columns are still a real Packages table.
    for sql in [
        "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, blob BLOB NOT NULL);
         INSERT INTO Packages SELECT hnum, blob FROM src.Packages;
         CREATE TABLE log (x);
         CREATE TRIGGER t AFTER UPDATE ON Packages BEGIN INSERT INTO log VALUES (1); END;",
        "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, blob BLOB) WITHOUT ROWID;
         INSERT INTO Packages SELECT hnum, blob FROM src.Packages;",
        "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, blob BLOB, extra TEXT);
         INSERT INTO Packages (hnum, blob) SELECT hnum, blob FROM src.Packages;
         CREATE INDEX e ON Packages (length(blob) * 2);",
    ] {
        let db = crafted(sql);
        let (result, took) = read(&db, &ReadOptions::default());
        fast(took);
        let scan = result.unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(scan.packages.len(), 129, "{sql}");
        assert!(scan.errors.is_empty(), "{sql}: {:?}", scan.errors);
    }
}

#[test]
fn huge_and_mistyped_rows_are_skipped_unread() {
    let db = crafted(
        "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, blob BLOB);
         INSERT INTO Packages SELECT hnum, blob FROM src.Packages;
         INSERT INTO Packages VALUES (100001, zeroblob(2000000));
         INSERT INTO Packages VALUES (100002, 'not a blob');
         INSERT INTO Packages VALUES (100003, 42);",
    );
    let options = ReadOptions {
        max_header_bytes: 1 << 20,
        ..ReadOptions::default()
    };
    let (result, took) = read(&db, &options);
    fast(took);
    // SQLITE_LIMIT_LENGTH is the same 1 MiB: had SQLite loaded the 2 MB blob, the whole read
    // would have failed with "string or blob too big".
    let scan = result.unwrap();
    assert_eq!(scan.packages.len(), 129, "the other rows are read");
    let reasons: Vec<(&str, &str)> = scan
        .errors
        .iter()
        .map(|e| (e.entry.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(reasons[0].0, "hnum 100001");
    assert!(reasons[0].1.contains("2000000 bytes"), "{reasons:?}");
    assert!(reasons[1].1.contains("not a BLOB") && reasons[2].1.contains("not a BLOB"));
    // The big blob was never decoded: only the real headers were.
    let real = rpmdb::read(&fixture("go-rpmdb_cbl-mariner-2.0/rpmdb.sqlite")).unwrap();
    assert_eq!(scan.bytes_decoded, real.bytes_decoded);
}
