//! Any bytes as a Berkeley DB `Packages` file: terminates without panicking; every package
//! reported was decoded from a validated header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((packages, _errors)) = rpmdb::bdb::read_bytes(data) {
        assert!(packages.len() <= data.len() / 16 + 1);
    }
});
