//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_corpora.rs`, which replays
//! their corpora: the classifier's two JSON paths and the parser's held memory, which are not
//! public otherwise. Not an API: no stability is promised.

use super::classify::{classified, classified_in, classify_serde};
use super::scan::{self, Prefix};
use super::{ChoiceInfo, Classified, EventKind, SseParser};

/// What a path classified, and the choices it kept (none for any kind but a token).
pub type Answer<'a> = (Classified<'a>, Vec<ChoiceInfo>);

fn answer<'a>(c: Classified<'a>, mut choices: Vec<ChoiceInfo>) -> Answer<'a> {
    if c.kind != EventKind::Token {
        choices.clear();
    }
    (c, choices)
}

/// The serde reference's answer for a JSON text (the data of an event that starts with `{`,
/// trimmed).
pub fn reference(json: &[u8]) -> Answer<'_> {
    let mut choices = Vec::new();
    let c = classify_serde(json, &mut choices);
    answer(c, choices)
}

/// The fast scanner's answer for a JSON text, read whole; `None` when it declines (then the
/// classifier asks serde). `None` too for a text that does not start with `{`, which the
/// classifier never gives it.
pub fn scanned(json: &[u8]) -> Option<Answer<'_>> {
    if json.first() != Some(&b'{') {
        return None;
    }
    let mut choices = Vec::new();
    let top = scan::top(json, &mut choices, None)?;
    let c = classified_in(&top, &mut choices);
    Some(answer(c, choices))
}

/// The scanner with the memory of earlier payloads that a stream's parser keeps, so that a
/// payload can be read from a remembered start or answered from a template.
#[derive(Debug, Default)]
pub struct Scanner {
    prefix: Prefix,
}

impl Scanner {
    /// A scanner that remembers nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `json` as the parser reads an event's data after the earlier ones given to this
    /// scanner (and remembers it); `None` when the scanner declines.
    pub fn scan<'a>(&'a mut self, json: &'a [u8]) -> Option<Answer<'a>> {
        if json.first() != Some(&b'{') {
            return None;
        }
        let mut choices = Vec::new();
        let top = scan::top(json, &mut choices, Some(&mut self.prefix))?;
        let c = classified_in(&top, &mut choices);
        Some(answer(c, choices))
    }

    /// The answer the parser's one-event fast path gives for `json` from the template of the
    /// payload read last; `None` when `json` does not fit it.
    pub fn templated<'a>(&'a self, json: &'a [u8]) -> Option<Answer<'a>> {
        scan::templated(json, &self.prefix, |top, choices| {
            answer(classified(top, !choices.is_empty()), choices.to_vec())
        })
    }
}

/// Bytes `parser` holds allocated between frames: its incomplete line, the current event's
/// data, and the earlier payload it remembers.
pub fn held(parser: &SseParser) -> [usize; 3] {
    parser.held()
}
