//! The event splitter: SSE bytes in, one event at a time out, at the blank line that ends it.

use super::apis::{Dialect, classify_api};
use super::classify::{Classified, classified, classify_in};
use super::scan;
use super::{ChoiceInfo, Event, EventKind};

/// Where the current event's data is while its lines arrive.
#[derive(Debug, Clone, Copy)]
enum Data {
    /// No `data:` line yet.
    Empty,
    /// One `data:` line, still inside the frame being fed (no copy made).
    InFrame(usize, usize),
    /// Copied into `SseParser::data` (several lines, or it spans frames).
    Buffered,
}

/// Splits an SSE byte stream into events, one frame at a time. The fields every frame reads
/// come first (`repr(C)`): most frames need no others.
#[derive(Debug)]
#[repr(C)]
pub struct SseParser {
    /// The start of an earlier payload, so that the next ones need not read it again (boxed:
    /// a parser is embedded in other state and should stay small).
    pub(super) prefix: Box<scan::Prefix>,
    /// The current block had a line of any kind (so a blank line ends an event).
    in_block: bool,
    /// The previous frame ended in `\r`: a leading `\n` in the next one belongs to it.
    skip_lf: bool,
    /// The current event is longer than `max_event`: its lines are passed over, unread, until
    /// the blank line that ends it.
    oversized: bool,
    /// Passing over an oversized event, a line that began in an earlier frame has not ended.
    in_skipped_line: bool,
    /// Events that went over `max_event` since [`SseParser::take_oversized`] was last called.
    oversized_count: u32,
    /// Bytes of the current event's lines so far (line ends counted as one byte each).
    event_len: usize,
    /// Longest event (or line) read; longer ones are reported as [`EventKind::Oversized`].
    max_event: usize,
    /// An incomplete line carried over from earlier frames.
    line: Vec<u8>,
    state: Data,
    /// Copied event data, when it could not be read in place.
    data: Vec<u8>,
    choices: Vec<ChoiceInfo>,
    /// Whose event rules classify the payloads. Only chat's fill `prefix`, so the other
    /// APIs' events never take the one-templated-event path.
    dialect: Dialect,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// The longest event read by default, bytes (`proxy.max_sse_event_bytes`).
    pub const DEFAULT_MAX_EVENT: usize = 1024 * 1024;

    /// A parser at the start of a stream, reading events up to the default size.
    pub fn new() -> Self {
        Self::with_max_event(Self::DEFAULT_MAX_EVENT)
    }

    /// A parser at the start of a stream that holds at most `max_event` bytes of one event (or
    /// line): past that, the rest of the event is passed over unread and it is reported as
    /// [`EventKind::Oversized`] at its blank line, so that what the parser holds stays bounded
    /// whatever the stream sends.
    pub fn with_max_event(max_event: usize) -> Self {
        SseParser {
            line: Vec::new(),
            data: Vec::new(),
            state: Data::Empty,
            in_block: false,
            skip_lf: false,
            oversized: false,
            oversized_count: 0,
            in_skipped_line: false,
            event_len: 0,
            max_event,
            choices: Vec::new(),
            prefix: Box::default(),
            dialect: Dialect::Chat,
        }
    }

    /// The parser, classifying events by `dialect`'s rules (chat's by default).
    pub fn with_dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// How many events went over the size limit since the last call: counted when an event
    /// crosses it, not at its blank line, so that an event that never ends is counted too.
    pub fn take_oversized(&mut self) -> u32 {
        std::mem::take(&mut self.oversized_count)
    }

    /// Feeds the next frame; `on_event` is called for each event the frame completes, in order.
    pub fn feed(&mut self, frame: &[u8], mut on_event: impl FnMut(&Event<'_>)) {
        if self.one_templated_event(frame, &mut on_event) {
            return;
        }
        let mut pos = 0;
        if self.skip_lf && !frame.is_empty() {
            self.skip_lf = false;
            if frame[0] == b'\n' {
                pos = 1;
            }
        }
        while pos < frame.len() {
            let Some(i) = memchr::memchr2(b'\n', b'\r', &frame[pos..]) else {
                self.line_continues(&frame[pos..]);
                break;
            };
            let eol = pos + i;
            let next = if frame[eol] == b'\r' {
                match frame.get(eol + 1) {
                    Some(b'\n') => eol + 2,
                    Some(_) => eol + 1,
                    None => {
                        self.skip_lf = true;
                        eol + 1
                    }
                }
            } else {
                eol + 1
            };
            if self.oversized {
                self.skip_line(eol == pos, next, &mut on_event);
            } else if self.line.is_empty() {
                if eol > pos && self.too_long(eol - pos) {
                    self.pass_over();
                } else {
                    self.line_in_frame(frame, pos, eol, next, &mut on_event);
                }
            } else if self.too_long(eol - pos) {
                self.pass_over();
            } else {
                self.line.extend_from_slice(&frame[pos..eol]);
                let line = std::mem::take(&mut self.line);
                self.line_buffered(&line, next, &mut on_event);
                self.line = line;
                self.line.clear();
            }
            pos = next;
        }
        // Data still waiting for its blank line cannot point into this frame any longer.
        if let Data::InFrame(start, end) = self.state {
            self.data.clear();
            self.data.extend_from_slice(&frame[start..end]);
            self.state = Data::Buffered;
        }
    }

    /// Counts `n` more bytes of the current event's lines and the line end that follows them;
    /// true when that makes the event longer than it may be.
    fn too_long(&mut self, n: usize) -> bool {
        self.grows(n + 1)
    }

    /// Counts `n` more bytes of the current event; true when that makes it longer than it may
    /// be. A line's bytes are counted once however many frames it spans, and its end once,
    /// when it comes: the same event is oversized or not whatever the frames.
    fn grows(&mut self, n: usize) -> bool {
        self.event_len = self.event_len.saturating_add(n);
        self.event_len > self.max_event
    }

    /// The rest of the frame is the start (or more) of a line that ends in a later frame.
    fn line_continues(&mut self, rest: &[u8]) {
        if self.oversized {
            self.in_skipped_line = true;
        } else if self.grows(rest.len()) {
            self.pass_over();
            self.in_skipped_line = true;
        } else {
            self.line.extend_from_slice(rest);
        }
    }

    /// The current event is too long: what is held of it is dropped, and its lines are passed
    /// over until its blank line.
    #[cold]
    fn pass_over(&mut self) {
        self.oversized = true;
        self.oversized_count = self.oversized_count.saturating_add(1);
        self.in_block = true;
        self.state = Data::Empty;
        // Whatever was held for this event goes, memory included.
        self.line = Vec::new();
        self.data = Vec::new();
    }

    /// A line of an oversized event ended at `next`: a blank one ends the event.
    #[cold]
    fn skip_line(&mut self, empty: bool, next: usize, on_event: &mut impl FnMut(&Event<'_>)) {
        if self.in_skipped_line {
            // The end of a line that began in an earlier frame: not blank.
            self.in_skipped_line = false;
            return;
        }
        if !empty {
            return;
        }
        self.oversized = false;
        self.in_block = false;
        self.event_len = 0;
        on_event(&Event {
            kind: EventKind::Oversized,
            choices: &[],
            usage: None,
            server: Default::default(),
            end: next,
            id: None,
            model: None,
            finish: None,
            data: &[],
        });
    }

    /// Reports `frame` when it is exactly one event, `data: `, a payload that fits the template
    /// of the payloads before it, and a blank line: most chunks of a stream after its first
    /// events. Such a payload has no line break (the template's text has none, and its content
    /// string none unescaped), so reading it line by line would report the same event; this
    /// skips that reading. False, having changed nothing, for any other frame.
    fn one_templated_event(&mut self, frame: &[u8], on_event: &mut impl FnMut(&Event<'_>)) -> bool {
        if self.in_block || self.skip_lf || !self.line.is_empty() || frame.len() > self.max_event {
            return false;
        }
        let Some(payload) = frame
            .strip_prefix(b"data: ")
            .and_then(|rest| rest.strip_suffix(b"\n\n"))
        else {
            return false;
        };
        scan::templated(payload, &self.prefix, |top, choices| {
            let c = classified(top, !choices.is_empty());
            on_event(&Event::of(c, choices, frame.len(), payload));
        })
        .is_some()
    }

    /// Bytes the parser holds between frames (allocated, not only used): an incomplete line,
    /// the current event's data, and the earlier payload it remembers.
    pub(super) fn held(&self) -> [usize; 3] {
        [
            self.line.capacity(),
            self.data.capacity(),
            self.prefix.text.capacity(),
        ]
    }

    /// True when bytes of an event that never got its blank line are pending: at end of stream
    /// that event is incomplete and, as the SSE standard says, is not dispatched.
    pub fn has_partial_event(&self) -> bool {
        self.in_block || !self.line.is_empty()
    }

    fn line_in_frame(
        &mut self,
        frame: &[u8],
        start: usize,
        eol: usize,
        next: usize,
        on_event: &mut impl FnMut(&Event<'_>),
    ) {
        let line = &frame[start..eol];
        if line.is_empty() {
            self.dispatch(Some(frame), next, on_event);
            return;
        }
        self.in_block = true;
        if let Some(value) = data_value(line) {
            let value_start = eol - value.len();
            match self.state {
                Data::Empty => self.state = Data::InFrame(value_start, eol),
                Data::InFrame(s, e) => {
                    self.data.clear();
                    self.data.extend_from_slice(&frame[s..e]);
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                    self.state = Data::Buffered;
                }
                Data::Buffered => {
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                }
            }
        }
    }

    fn line_buffered(&mut self, line: &[u8], next: usize, on_event: &mut impl FnMut(&Event<'_>)) {
        if line.is_empty() {
            self.dispatch(None, next, on_event);
            return;
        }
        self.in_block = true;
        if let Some(value) = data_value(line) {
            match self.state {
                Data::Empty => {
                    self.data.clear();
                    self.data.extend_from_slice(value);
                }
                // A buffered line always follows the end of the previous frame, which moved
                // in-frame data into the buffer already.
                Data::InFrame(..) | Data::Buffered => {
                    self.data.push(b'\n');
                    self.data.extend_from_slice(value);
                }
            }
            self.state = Data::Buffered;
        }
    }

    fn dispatch(
        &mut self,
        frame: Option<&[u8]>,
        end: usize,
        on_event: &mut impl FnMut(&Event<'_>),
    ) {
        if !self.in_block {
            return;
        }
        self.in_block = false;
        self.event_len = 0;
        let state = std::mem::replace(&mut self.state, Data::Empty);
        let data = std::mem::take(&mut self.data);
        let payload: Option<&[u8]> = match (state, frame) {
            (Data::Empty, _) => None,
            (Data::InFrame(s, e), Some(frame)) => Some(&frame[s..e]),
            (Data::InFrame(..), None) => unreachable_in_frame(),
            (Data::Buffered, _) => Some(&data),
        };
        self.choices.clear();
        let c = match payload {
            None => Classified::of(EventKind::NoData),
            Some(payload) if self.dialect == Dialect::Chat => {
                classify_in(payload, &mut self.choices, Some(&mut self.prefix))
            }
            Some(payload) => classify_api(self.dialect, payload, &mut self.choices),
        };
        on_event(&Event::of(
            c,
            &self.choices,
            end,
            payload.unwrap_or_default(),
        ));
        self.data = data;
        self.data.clear();
    }
}

/// In-frame data is moved to the buffer at the end of every frame, so a line assembled from
/// several frames never meets it; classify nothing rather than panic if that ever changes.
#[cold]
fn unreachable_in_frame() -> Option<&'static [u8]> {
    None
}

/// The value of a `data` field line (`data:x`, `data: x`, or a bare `data`), else `None`.
fn data_value(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data")?;
    match rest.first() {
        None => Some(rest),
        Some(b':') => {
            let v = &rest[1..];
            Some(v.strip_prefix(b" ").unwrap_or(v))
        }
        Some(_) => None,
    }
}
