//! Any bytes as `rpmdb.sqlite`: the reader (SQLite underneath, then our header decoder) never
//! panics, and never creates files next to the database.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let db = dir.path().join("rpmdb.sqlite");
    if std::fs::write(&db, data).is_err() {
        return;
    }
    let _ = rpmdb::read(dir.path());
    let created = std::fs::read_dir(dir.path()).map(|d| d.count()).unwrap_or(1);
    assert_eq!(created, 1, "the reader created files next to the database");
});
