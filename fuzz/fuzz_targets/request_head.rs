//! Fuzzes `reject_bad_request` and the header sanitising of a request head.
//! The body is shared with `tests/fuzz_corpus.rs`: see `fuzz/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
#[allow(dead_code)]
mod harness;

fuzz_target!(|data: &[u8]| {
    let _ = harness::request_head(data);
});
