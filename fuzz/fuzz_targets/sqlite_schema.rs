//! Hostile SQLite *schemas*, not only hostile bytes: the input is a program that builds a
//! database — `Packages` as a real table (odd columns, WITHOUT ROWID, generated columns), a
//! view (recursive CTEs that never end), a virtual table (fts3/4/5, rtree, unknown modules),
//! triggers, expression indexes, huge or mistyped rows, a schema rewritten behind SQLite's back
//! — and the rpm database reader and the dnf history reader run on it with a short deadline.
//! They must return (a typed error is fine) without panicking, hanging, or creating files.
#![no_main]

use std::{
    path::Path,
    time::{Duration, Instant},
};

use libfuzzer_sys::fuzz_target;
use rusqlite::Connection;

/// A real header blob, so that some rows decode.
const HEADER: &[u8] = include_bytes!(
    "../../../shared/fixtures/rpmdb/header-blobs/claircore_package-header/package.header"
);

/// How long one read may take before it must have been stopped (the deadline is 100 ms).
const HANG: Duration = Duration::from_secs(5);

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self
            .0
            .split_first()
            .map(|(b, r)| (*b, r))
            .unwrap_or((0, &[]));
        self.0 = rest;
        b
    }
    fn num(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), 0])
    }
    fn pick<'s>(&mut self, options: &[&'s str]) -> &'s str {
        options[self.byte() as usize % options.len()]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

const COLUMNS: &[&str] = &[
    "hnum INTEGER PRIMARY KEY AUTOINCREMENT, blob BLOB NOT NULL",
    "hnum INTEGER PRIMARY KEY, blob BLOB",
    "hnum INTEGER PRIMARY KEY, blob",
    "hnum TEXT PRIMARY KEY, blob BLOB",
    "hnum INTEGER, blob BLOB",
    "hnum INTEGER PRIMARY KEY, raw BLOB, blob BLOB AS (raw)",
    "hnum INTEGER PRIMARY KEY, raw BLOB, blob BLOB AS (zeroblob(3000000)) STORED",
    "hnum INTEGER PRIMARY KEY, blob BLOB, extra TEXT DEFAULT (printf('%.*c', 1000000, 'x'))",
    "hnum INTEGER PRIMARY KEY, blob BLOB CHECK (length(blob) > 0)",
    "hnum INTEGER PRIMARY KEY DESC, blob BLOB",
    "blob BLOB, hnum INTEGER PRIMARY KEY",
    "hnum, blob",
];

const SUFFIX: &[&str] = &["", " WITHOUT ROWID", " STRICT"];

const VIEWS: &[&str] = &[
    "WITH RECURSIVE c(hnum, blob) AS (SELECT 1, x'00' UNION ALL SELECT hnum + 1, blob FROM c) SELECT * FROM c",
    "WITH RECURSIVE c(hnum, blob) AS (SELECT 1, zeroblob(1000) UNION ALL SELECT hnum + 1, blob || blob FROM c) SELECT * FROM c",
    "SELECT 1 AS hnum, randomblob(1000000000) AS blob",
    "SELECT a.hnum, a.blob FROM P0 a, P0 b, P0 c, P0 d",
    "SELECT hnum, blob FROM P0",
    "SELECT * FROM Packages",
];

const VTABS: &[&str] = &[
    "fts5(hnum, blob)",
    "fts4(hnum, blob)",
    "fts3(hnum, blob)",
    "rtree(hnum, blob, x)",
    "rtree_i32(hnum, a, b)",
    "nosuch(hnum, blob)",
    "fts5(hnum, blob, tokenize = 'porter unicode61')",
    "fts5vocab(P0, 'row')",
];

/// One statement of the program after `Packages` is defined.
fn statement(input: &mut Input) -> String {
    match input.byte() % 12 {
        0 | 1 => {
            let n = input.num() % 64;
            format!(
                "WITH RECURSIVE s(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM s WHERE v < {n})
                 INSERT INTO Packages (hnum, blob) SELECT v + {n} * 1000, ?1 FROM s"
            )
        }
        2 => format!(
            "INSERT INTO Packages (hnum, blob) VALUES ({}, zeroblob({}))",
            input.num(),
            input.num() % 2_000_000
        ),
        3 => format!(
            "INSERT INTO Packages (hnum, blob) VALUES ({}, {})",
            input.num(),
            input.pick(&["'text'", "42", "NULL", "1.5", "x''", "?2"])
        ),
        4 => format!(
            "CREATE TRIGGER t{} {} {} ON Packages BEGIN {}; END",
            input.num(),
            input.pick(&["BEFORE", "AFTER"]),
            input.pick(&["INSERT", "UPDATE", "DELETE"]),
            input.pick(&[
                "SELECT count(*) FROM Packages",
                "INSERT INTO Packages (blob) VALUES (zeroblob(100))",
                "SELECT RAISE(ABORT, 'x')",
            ])
        ),
        5 => format!(
            "CREATE INDEX i{} ON Packages ({})",
            input.num(),
            input.pick(&["hnum", "length(blob)", "hnum * 2", "abs(hnum)", "blob", "hnum, blob", "substr(blob, 1, 4)"])
        ),
        6 => format!(
            "CREATE VIEW v{} AS {}",
            input.num(),
            input.pick(VIEWS)
        ),
        7 => format!(
            "CREATE VIRTUAL TABLE x{} USING {}",
            input.num(),
            input.pick(VTABS)
        ),
        // Rewrite the schema behind SQLite's back, as a crafted file can.
        8 => format!(
            "UPDATE sqlite_schema SET {} WHERE name = 'Packages'",
            input.pick(&[
                "rootpage = 0",
                "rootpage = 2",
                "rootpage = 100000",
                "type = 'view'",
                "type = 'index'",
                "sql = 'CREATE VIRTUAL TABLE Packages USING nosuch(hnum, blob)'",
                "sql = 'CREATE VIEW Packages AS WITH RECURSIVE c(hnum, blob) AS (SELECT 1, 2 UNION ALL SELECT hnum + 1, blob FROM c) SELECT * FROM c'",
                "sql = 'CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, blob BLOB AS (randomblob(1000000000)))'",
                "sql = replace(sql, 'blob', 'blob2')",
                "name = 'packages'",
            ])
        ),
        9 => format!(
            "INSERT INTO sqlite_schema VALUES ('{}', 'Packages', 'Packages', {}, 'CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, blob BLOB)')",
            input.pick(&["table", "view", "index", "trigger"]),
            input.num() % 8
        ),
        10 => format!(
            "CREATE TABLE c{} (a INTEGER PRIMARY KEY, b {} CHECK ({}))",
            input.num(),
            input.pick(&["BLOB", "TEXT", "ANY"]),
            input.pick(&["length(b) < 10", "b IS NOT NULL", "a > 0"])
        ),
        _ => format!(
            "DELETE FROM Packages WHERE hnum % {} = 0",
            input.num() % 7 + 1
        ),
    }
}

/// Builds the database at `path` from the input; every statement may fail.
fn build(path: &Path, input: &mut Input) {
    let Ok(c) = Connection::open(path) else {
        return;
    };
    let _ = c.execute_batch("PRAGMA journal_mode = DELETE");
    let columns = input.pick(COLUMNS);
    let suffix = input.pick(SUFFIX);
    let definition = match input.byte() % 8 {
        0 => format!("CREATE VIEW Packages AS {}", input.pick(VIEWS)),
        1 => format!("CREATE VIRTUAL TABLE Packages USING {}", input.pick(VTABS)),
        2 => String::new(),
        _ => format!("CREATE TABLE Packages ({columns}){suffix}"),
    };
    // P0: a real table views and vtabs can refer to.
    let _ = c.execute_batch(&format!(
        "CREATE TABLE P0 (hnum INTEGER PRIMARY KEY, blob BLOB); {definition};"
    ));
    let junk_len = input.byte() as usize * 16;
    let junk = input.bytes(junk_len);
    let mut statements = 0;
    while !input.done() && statements < 24 {
        statements += 1;
        let sql = statement(input);
        let _ = c.execute_batch("PRAGMA writable_schema = ON");
        if let Ok(mut s) = c.prepare(&sql) {
            let _ = match s.parameter_count() {
                0 => s.execute([]),
                1 => s.execute([HEADER]),
                _ => s.execute([HEADER, junk.as_slice()]),
            };
        }
    }
    let _ = c.execute_batch("PRAGMA writable_schema = OFF");
}

fn listing(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else { return };
    let root = tmp.path();
    let rpm = root.join("var/lib/rpm");
    let dnf = root.join("var/lib/dnf");
    if std::fs::create_dir_all(&rpm).is_err() || std::fs::create_dir_all(&dnf).is_err() {
        return;
    }
    build(&rpm.join("rpmdb.sqlite"), &mut Input(data));
    // The same database as a dnf history: its own schema checks and queries.
    if std::fs::copy(rpm.join("rpmdb.sqlite"), dnf.join("history.sqlite")).is_err() {
        return;
    }
    let before = (listing(&rpm), listing(&dnf));

    let options = rpmdb::ReadOptions::timeout(Duration::from_millis(100));
    let started = Instant::now();
    let _ = rpmdb::read_with(rpmdb::Source::Root(root), &options);
    assert!(
        started.elapsed() < HANG,
        "the rpm database read was not stopped"
    );

    let started = Instant::now();
    let _ = report::SystemInfo::read_with(
        root,
        &rpmdb::ReadOptions::timeout(Duration::from_millis(100)),
    );
    assert!(started.elapsed() < HANG, "the history read was not stopped");

    assert_eq!(
        (listing(&rpm), listing(&dnf)),
        before,
        "the readers created files next to the databases"
    );
});
