//! Fuzz target `responses`: the Responses API's streams (`/v1/responses`); the properties are in
//! `tokentap_fuzz::responses` (`fuzz/src/lib.rs`), which `tests/fuzz_corpora.rs` also runs on every
//! file of `fuzz/corpus/responses/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokentap_fuzz::responses(data));
