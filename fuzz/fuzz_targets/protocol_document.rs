//! Arbitrary bytes as a report's compact payload, as the relay reads one from a guest: the
//! first byte picks the encoding (plain or zstd, with or without the shipped dictionary), the
//! rest is the payload. Decompression stays within its limit; a document or a delta that
//! decodes re-encodes to the same value; applying a delta to a base never panics, and what
//! it gives has records unique by key.
#![no_main]

use guestwatch_protocol::{
    Payload, PayloadEncoding,
    inventory::{DeltaDocument, Document, PackageRecord, SystemFacts},
};
use libfuzzer_sys::fuzz_target;

fn base() -> Vec<PackageRecord> {
    ["bash", "curl", "vim"]
        .into_iter()
        .map(|name| PackageRecord {
            name: name.into(),
            version: "1".into(),
            release: "1.el9".into(),
            arch: Some("x86_64".into()),
            ..PackageRecord::default()
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let encoding = if pick & 1 == 0 {
        PayloadEncoding::Document
    } else {
        PayloadEncoding::DocumentZstd
    };
    let payload = Payload {
        encoding,
        bytes: bytes.to_vec(),
    };
    let Ok(plain) = payload.to_document(1 << 20) else {
        return;
    };
    assert!(plain.len() <= 1 << 20);
    if let Ok(doc) = Document::from_bytes(&plain) {
        let again = Document::from_bytes(&doc.to_bytes()).expect("re-decode");
        assert_eq!(again, doc);
        let _ = doc.content_hash();
    }
    if let Ok(delta) = DeltaDocument::from_bytes(&plain) {
        let again = DeltaDocument::from_bytes(&delta.to_bytes()).expect("re-decode");
        assert_eq!(again, delta);
        if let Ok(applied) = delta.apply(&base()) {
            let mut keys: Vec<_> = applied.packages.iter().map(PackageRecord::key).collect();
            keys.dedup();
            assert_eq!(keys.len(), applied.packages.len(), "unique and sorted");
        }
        let _ = Document::new(Vec::new(), SystemFacts::default()).delta_from(&base());
    }
});
