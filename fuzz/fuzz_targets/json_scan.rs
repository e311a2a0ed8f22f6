//! Fuzz target `json_scan`: the properties are in `tokentap_fuzz::json_scan` (`fuzz/src/lib.rs`), which
//! `tests/fuzz_corpora.rs` also runs on every file of `fuzz/corpus/json_scan/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokentap_fuzz::json_scan(data));
