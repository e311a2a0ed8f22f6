//! Fuzz target `chunked`: the properties are in `tokentap_fuzz::chunked` (`fuzz/src/lib.rs`), which
//! `tests/fuzz_corpora.rs` also runs on every file of `fuzz/corpus/chunked/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokentap_fuzz::chunked(data));
