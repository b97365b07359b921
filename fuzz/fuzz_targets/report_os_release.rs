//! Any text as an os-release file: the parser never panics, every value it keeps came from a
//! line of the input, and every line it rejects is recorded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut problems = Vec::new();
    let fields = report::system::parse_os_release(text, "/etc/os-release", &mut problems);
    let lines = text.lines().count();
    assert!(fields.len() + problems.len() <= lines);
    for (key, value) in &fields {
        assert!(text.contains(key.as_str()));
        assert!(value.len() <= text.len());
    }
});
