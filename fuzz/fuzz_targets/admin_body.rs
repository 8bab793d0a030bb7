//! Fuzzes the JSON decoding of the admin API's request bodies.
//! The body is shared with `tests/fuzz_corpus.rs`: see `fuzz/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
#[allow(dead_code)]
mod harness;

fuzz_target!(|data: &[u8]| {
    let _ = harness::admin_body(data);
});
