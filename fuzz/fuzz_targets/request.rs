//! Fuzz target `request`: the properties are in `tokentap_fuzz::request` (`fuzz/src/lib.rs`), which
//! `tests/fuzz_corpora.rs` also runs on every file of `fuzz/corpus/request/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokentap_fuzz::request(data));
