//! Fuzz target `usage_cut`: the properties are in `tokentap_fuzz::usage_cut` (`fuzz/src/lib.rs`), which
//! `tests/fuzz_corpora.rs` also runs on every file of `fuzz/corpus/usage_cut/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokentap_fuzz::usage_cut(data));
