//! Replays every seed of the fuzz targets' corpora (`fuzz/corpus/<target>/`) through the same
//! checks the targets run (`fuzz/src/lib.rs`, included here), so that the inputs that found a
//! bug keep being checked by `cargo test`, without a fuzzer or a nightly toolchain.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

/// Runs `check` on every file of `fuzz/corpus/<target>/`; fails when there are none.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{target}: {} seeds", files.len());
    for file in files {
        let data = std::fs::read(&file).expect("a corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target}: fails on {}", file.display());
    }
}

#[test]
fn request() {
    replay("request", checks::request);
}

#[test]
fn chunked() {
    replay("chunked", checks::chunked);
}

#[test]
fn response_head() {
    replay("response_head", checks::response_head);
}

#[test]
fn sse() {
    replay("sse", checks::sse);
}

#[test]
fn json_scan() {
    replay("json_scan", checks::json_scan);
}

#[test]
fn usage_cut() {
    replay("usage_cut", checks::usage_cut);
}

#[test]
fn responses() {
    replay("responses", checks::responses);
}

#[test]
fn messages() {
    replay("messages", checks::messages);
}

#[test]
fn accept() {
    replay("accept", checks::accept);
}
