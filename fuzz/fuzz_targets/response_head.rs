//! Fuzz target `response_head`: the properties are in `tokentap_fuzz::response_head` (`fuzz/src/lib.rs`), which
//! `tests/fuzz_corpora.rs` also runs on every file of `fuzz/corpus/response_head/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokentap_fuzz::response_head(data));
