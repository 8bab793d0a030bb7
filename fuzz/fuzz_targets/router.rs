//! Fuzzes the routing of one request: host → site, preview, site modes and
//! `read_only.allow_paths`, against a fixed routing snapshot.
//! The body is shared with `tests/fuzz_corpus.rs`: see `fuzz/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
#[allow(dead_code)]
mod harness;

fuzz_target!(|data: &[u8]| {
    let _ = harness::router(data);
});
