//! Fuzz target `messages`: the Messages API's streams (`/v1/messages`); the properties are in
//! `tokentap_fuzz::messages` (`fuzz/src/lib.rs`), which `tests/fuzz_corpora.rs` also runs on every
//! file of `fuzz/corpus/messages/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokentap_fuzz::messages(data));
