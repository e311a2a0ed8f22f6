//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_corpora.rs`, which replays
//! their corpora: request-body inspection's two readers and the usage cutter's per-frame step,
//! which are not public otherwise. Not an API: no stability is promised.

use bytes::Bytes;

use super::strip::Cut;

use crate::route::RequestInfo;
use crate::sse::{EventKind, SseParser};

/// What the request-body scanner reads in `body` (`None` where it declines), and what serde,
/// the reference, reads (`None` where it refuses).
pub fn inspect_both(body: &[u8]) -> (Option<RequestInfo>, Option<RequestInfo>) {
    (
        super::inspect::scanned(body),
        super::inspect::by_serde(body),
    )
}

/// The usage cutter as the proxy runs it on a stream, without the body around it: each frame
/// is parsed, then cut, as `StripUsage` does.
#[derive(Debug)]
pub struct Cutter {
    parser: SseParser,
    cut: Cut,
    ends: Vec<(usize, bool)>,
}

impl Cutter {
    /// A cutter for a stream whose parser reads events of up to `max_event` bytes.
    pub fn new(max_event: usize) -> Self {
        Cutter {
            parser: SseParser::with_max_event(max_event),
            cut: Cut::new(max_event),
            ends: Vec::new(),
        }
    }

    /// What goes out to the client for the next frame.
    pub fn frame(&mut self, frame: &[u8]) -> Bytes {
        self.ends.clear();
        let ends = &mut self.ends;
        self.parser
            .feed(frame, |e| ends.push((e.end, e.kind == EventKind::Usage)));
        self.cut.frame(Bytes::copy_from_slice(frame), &self.ends)
    }

    /// Bytes held back, waiting for the end of their event.
    pub fn held(&self) -> usize {
        self.cut.held()
    }

    /// What goes out when the stream ends: the held bytes of an incomplete last event.
    pub fn finish(mut self) -> Bytes {
        self.cut.finish()
    }
}
