//! Arbitrary bytes as a stream of frames: decoding never panics, never over-allocates, always
//! makes progress, and anything that decodes re-encodes (in the version it came in) to the same
//! message.
#![no_main]

use guestwatch_protocol::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match frame::decode(&data[at..], 1 << 20) {
            Ok(Some(decoded)) => {
                assert!(decoded.consumed > 0 && at + decoded.consumed <= data.len());
                at += decoded.consumed;
                if let Ok(message) = decoded.message {
                    let bytes = frame::encode(decoded.version, &message, u32::MAX).expect("re-encode");
                    let again = frame::decode(&bytes, u32::MAX).expect("decode").expect("whole");
                    assert_eq!(again.message.expect("valid"), message);
                    if let guestwatch_protocol::Message::Report(report) = &message {
                        let _ = report.body.payload().to_json(1 << 20);
                        let _ = report.body.payload().to_document(1 << 20);
                        let _ = report.facts.check_limits();
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
