//! Fuzzes the reading of the state file at start (`FileStore::load`).
//! The body is shared with `tests/fuzz_corpus.rs`: see `fuzz/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
#[allow(dead_code)]
mod harness;

fuzz_target!(|data: &[u8]| {
    let _ = harness::state_file(data);
});
