//! Any bytes as an NDB `Packages.db`: terminates without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((packages, _errors)) = rpmdb::ndb::read_bytes(data) {
        assert!(packages.len() <= data.len() / 16);
    }
});
