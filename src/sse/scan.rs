//! A single-pass classifier for well-formed JSON, several times faster than the serde visitor.
//!
//! It reads what [`super::classify()`] needs and skips everything else while checking JSON syntax as
//! strictly as `serde_json` does (strings, escapes, numbers, literals, nesting). Whenever the
//! input is not one it is sure to read exactly like the serde path (malformed JSON, a duplicate
//! or escaped key, a field of an unexpected type, deep nesting), it returns `None` and
//! [`super::classify()`] falls back to serde, so both always agree. Its [`Scan`] reads request
//! bodies for `inspect` the same way.

use smallvec::SmallVec;

use super::classify::{DeltaFields, delta_output, finish_reason, non_empty};
use super::{ChoiceInfo, ServerRaw, Usage};

/// What the top level carried.
pub(super) struct Top<'a> {
    pub(super) usage: Option<Usage>,
    pub(super) server: ServerRaw<'a>,
    pub(super) error: bool,
    pub(super) id: Option<&'a str>,
    pub(super) model: Option<&'a str>,
}

/// The top-level fields read up to some point of a scan.
#[derive(Debug, Clone, Copy, Default)]
struct Fields {
    /// One bit per key read, to refuse duplicates.
    seen: u8,
    usage: Option<Usage>,
    error: bool,
    /// Where the `id` string's text is, when it is a plain string.
    id: Option<(usize, usize)>,
    /// Where the `model` string's text is, when it is a plain string.
    model: Option<(usize, usize)>,
    /// Where the raw `metrics` (vLLM) and `timings` (llama.cpp) values are.
    metrics: Option<(usize, usize)>,
    timings: Option<(usize, usize)>,
}

impl Fields {
    /// Reads the value of the top-level member `key`, pushing token choices into `choices`.
    #[inline]
    fn read(&mut self, s: &mut Scan<'_>, key: &[u8], choices: &mut Vec<ChoiceInfo>) -> Option<()> {
        let bit = match key {
            b"choices" => 1,
            b"usage" => 2,
            b"error" => 4,
            b"id" => 8,
            b"model" => 16,
            b"metrics" => 32,
            b"timings" => 64,
            _ => return s.value(1),
        };
        if self.seen & bit != 0 {
            return None;
        }
        self.seen |= bit;
        match bit {
            1 => s.choices(choices)?,
            2 => self.usage = s.usage()?,
            4 => self.error = s.raw(1)? != b"null",
            8 => self.id = s.plain_string()?,
            16 => self.model = s.plain_string()?,
            32 => self.metrics = Some(s.raw_range()?),
            _ => self.timings = Some(s.raw_range()?),
        }
        Some(())
    }
}

/// An earlier payload, where its `choices` member starts and the fields read before it, and
/// what reading it gave.
///
/// The scanner decides everything before a position from the bytes before it, so a payload
/// that starts with the same bytes reaches that position in the same state and is read on
/// from there. Every chunk of a vLLM stream repeats its `id`, `object`, `created` and
/// `model`, which are most of its bytes; most chunks differ from the one before only in
/// the text of their content string, and then they read exactly like it (see [`Template`]).
#[derive(Debug, Clone, Default)]
#[repr(C)]
pub(super) struct Prefix {
    /// What most chunks are checked against, first, next to the text's pointer and length
    /// (`repr(C)`): a chunk that fits the template reads nothing else here.
    template: Option<Template>,
    /// The payload, kept only when it is UTF-8 so that `id` and `model` can be read from
    /// it without checking them again.
    pub(super) text: String,
    /// The text has no line break (`\n` or `\r`), so neither has a payload that fits its
    /// template (see [`templated`]).
    single_line: bool,
    /// Where its `choices` member starts; 0 when there is nothing to resume from.
    at: usize,
    /// The fields read before `at`.
    fields: Fields,
}

/// Where the first content string of a payload is (`delta.content` or `text` of a choice),
/// and everything reading the payload gave. A payload that differs only inside that string,
/// with a valid string there that is empty exactly when the old one was, gives the same:
/// the scanner reads that string only to check it and to see whether it is empty.
#[derive(Debug, Clone, Default)]
#[repr(C)]
struct Template {
    /// Positions of its opening and closing quotes.
    open: usize,
    close: usize,
    /// The top-level fields read, `id` and `model` before `open`.
    fields: Fields,
    /// Inline for one or two choices, so that reading them touches no other allocation.
    choices: SmallVec<[ChoiceInfo; 2]>,
}

impl Prefix {
    /// Whether `json` is read on from the remembered state (tests count them).
    #[cfg(test)]
    pub(super) fn resumes(&self, json: &[u8]) -> bool {
        self.at > 0 && json.starts_with(&self.text.as_bytes()[..self.at])
    }

    /// Whether `json` is answered from the template (tests count them).
    #[cfg(test)]
    pub(super) fn templated(&self, json: &[u8]) -> bool {
        self.template.as_ref().is_some_and(|t| self.fits(json, t))
    }

    /// Whether `json` differs from the remembered payload only inside its template's
    /// string: the same bytes up to the string and after it, and a valid string there.
    fn fits(&self, json: &[u8], t: &Template) -> bool {
        let old = self.text.as_bytes();
        if json.get(..=t.open) != old.get(..=t.open) {
            return false;
        }
        let mut s = Scan {
            b: json,
            i: t.open,
            var: None,
        };
        let Some((start, end, _)) = s.string() else {
            return false;
        };
        (end == start) == (t.close == t.open + 1)
            && json.get(end..) == old.get(t.close..)
            && (json[start..end].is_ascii() || std::str::from_utf8(&json[start..end]).is_ok())
    }

    /// Remembers the template of the payload just read, reusing the old one's allocation
    /// (none without a content string, or with `id` or `model` after it).
    fn remember(&mut self, var: Option<(usize, usize)>, f: Fields, choices: &[ChoiceInfo]) {
        let before = |open: usize, r: Option<(usize, usize)>| r.is_none_or(|(_, end)| end < open);
        match var {
            Some((open, close))
                if before(open, f.id)
                    && before(open, f.model)
                    && before(open, f.metrics)
                    && before(open, f.timings) =>
            {
                let t = self.template.get_or_insert_with(Template::default);
                (t.open, t.close, t.fields) = (open, close, f);
                t.choices.clear();
                t.choices.extend_from_slice(choices);
            }
            _ => self.template = None,
        }
    }
}

/// Nesting beyond this is left to serde (whose limit is 128).
const MAX_DEPTH: u32 = 64;

/// A position in a JSON text, read forwards.
pub(crate) struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// The opening and closing quotes of the first content string read (see [`Template`]).
    var: Option<(usize, usize)>,
}

/// Reads `json` (which starts with `{`), pushing token choices into `choices`. With a
/// `prefix`, a payload that fits its template gives what that one gave, one that starts like
/// the payload it remembers is read from where its `choices` start (and remembered), and
/// any other is read whole and remembered.
pub(super) fn top<'a>(
    json: &'a [u8],
    choices: &mut Vec<ChoiceInfo>,
    prefix: Option<&'a mut Prefix>,
) -> Option<Top<'a>> {
    match prefix {
        Some(p) if p.template.as_ref().is_some_and(|t| p.fits(json, t)) => {
            let p: &'a Prefix = p;
            let t = p.template.as_ref()?;
            choices.extend_from_slice(&t.choices);
            top_of(json, &p.text[..t.open], &t.fields)
        }
        Some(p) if p.at > 0 && json.starts_with(&p.text.as_bytes()[..p.at]) => {
            let mut f = p.fields;
            let mut s = Scan {
                b: json,
                i: p.at,
                var: None,
            };
            s.members(|s, _, key| f.read(s, key, choices))?;
            // The same start: only the rest needs checking to remember this payload.
            if let Ok(rest) = std::str::from_utf8(&json[p.at..]) {
                p.text.truncate(p.at);
                p.text.push_str(rest);
                p.single_line = memchr::memchr2(b'\n', b'\r', p.text.as_bytes()).is_none();
                p.remember(s.var, f, choices);
            }
            let p: &'a Prefix = p;
            top_of(json, &p.text[..p.at], &f)
        }
        prefix => {
            // Where the `choices` member starts, and the fields read before it; only after
            // a comma, as the first member's position depends on the byte there (`{}`).
            let mut mark = None;
            let mut first = true;
            let mut f = Fields::default();
            let mut s = Scan {
                b: json,
                i: 0,
                var: None,
            };
            s.object_at(|s, at, key| {
                let after_comma = !std::mem::replace(&mut first, false);
                if key == b"choices" && after_comma {
                    mark = Some((at, f));
                }
                f.read(s, key, choices)
            })?;
            if let (Some(p), Some((at, fields))) = (prefix, mark)
                && let Ok(text) = std::str::from_utf8(json)
            {
                p.text.clear();
                // Room for the longer content strings of the chunks to come: they replace
                // this text without growing it.
                p.text.reserve(text.len() + 128);
                p.text.push_str(text);
                p.single_line = memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_none();
                p.at = at;
                p.fields = fields;
                p.remember(s.var, f, choices);
            }
            top_of(json, "", &f)
        }
    }
}

/// Hands `then` what `json` carried, and its token choices, when it fits the template of the
/// payload `p` remembers and that payload had no line break: then `json` has none either.
/// `None` for any other payload. What was read is lent rather than returned: returned, it is
/// copied on its way out on every templated chunk.
pub(super) fn templated<'a, R>(
    json: &'a [u8],
    p: &'a Prefix,
    then: impl FnOnce(&Top<'a>, &'a [ChoiceInfo]) -> R,
) -> Option<R> {
    let t = p.template.as_ref()?;
    if !p.single_line || !p.fits(json, t) {
        return None;
    }
    let top = top_of(json, &p.text[..t.open], &t.fields)?;
    Some(then(&top, &t.choices))
}

/// What the top level of `json` carried, from the fields read; `known` is a start of `json`
/// already checked to be UTF-8.
fn top_of<'a>(json: &'a [u8], known: &'a str, f: &Fields) -> Option<Top<'a>> {
    let raw = |r: Option<(usize, usize)>| r.and_then(|(start, end)| json.get(start..end));
    Some(Top {
        usage: f.usage,
        server: ServerRaw {
            metrics: raw(f.metrics),
            timings: raw(f.timings),
        },
        error: f.error,
        id: text(json, known, f.id)?,
        model: text(json, known, f.model)?,
    })
}

/// The text at `range` of `json`, whose first bytes are `known`: `Some(None)` without a
/// range, `None` when it is not UTF-8.
fn text<'a>(
    json: &'a [u8],
    known: &'a str,
    range: Option<(usize, usize)>,
) -> Option<Option<&'a str>> {
    let Some((start, end)) = range else {
        return Some(None);
    };
    match known.get(start..end) {
        Some(text) => Some(Some(text)),
        None => std::str::from_utf8(json.get(start..end)?).ok().map(Some),
    }
}

/// The position of the first byte of `b` from `i` on that a string cannot hold as it is
/// (`"`, `\\` or a control character), or with `ascii` that is not ASCII either; `b.len()`
/// when there is none. Eight bytes are looked at a time.
#[inline]
fn special(b: &[u8], mut i: usize, ascii: bool) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let non_ascii = if ascii { HIGH } else { 0 };
    while let Some(chunk) = b.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let v = u64::from_le_bytes(*chunk);
        let quote = v ^ (ONES * u64::from(b'"'));
        let backslash = v ^ (ONES * u64::from(b'\\'));
        // A byte is flagged when it is zero (after the xor) or below 0x20, or (with
        // `ascii`) has its high bit set.
        let flagged = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (v.wrapping_sub(ONES * 0x20) & !v)
            | (v & non_ascii);
        let flagged = flagged & HIGH;
        if flagged != 0 {
            // The lowest flagged byte is exact (borrows only run towards higher bytes).
            return i + flagged.trailing_zeros() as usize / 8;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if matches!(c, b'"' | b'\\' | 0..=0x1f) || (ascii && !c.is_ascii()) {
            return i;
        }
        i += 1;
    }
    i
}

impl<'a> Scan<'a> {
    /// A scanner at the start of `b`.
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Scan { b, i: 0, var: None }
    }

    /// Whether only whitespace is left (serde's check for trailing characters).
    pub(crate) fn at_end(&mut self) -> bool {
        self.ws();
        self.i == self.b.len()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    #[inline]
    pub(crate) fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    /// `{ "key": value, … }`; `field` reads each value (the scanner is just past the `:`).
    #[inline]
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.object_at(|s, _, key| field(s, key))
    }

    /// An object whose members named in `keys` are each read by `read`, given the key's
    /// index, at most once (serde refuses a field given twice: `None`); other members are
    /// skipped, their syntax checked, as values at `depth`.
    pub(crate) fn fields(
        &mut self,
        keys: &[&[u8]],
        depth: u32,
        mut read: impl FnMut(&mut Self, usize) -> Option<()>,
    ) -> Option<()> {
        let mut seen = 0u32;
        self.object(|s, key| {
            let Some(k) = keys.iter().position(|k| *k == key) else {
                return s.value(depth);
            };
            if seen & 1 << k != 0 {
                return None;
            }
            seen |= 1 << k;
            read(s, k)
        })
    }

    /// [`Self::object`], telling `field` where each member starts.
    #[inline]
    fn object_at(
        &mut self,
        field: impl FnMut(&mut Self, usize, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.i += 1;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        self.members(field)
    }

    /// The members of an object from the first (or one after a comma) to its `}`; `field`
    /// gets the position each member starts at and its key.
    #[inline]
    fn members(
        &mut self,
        mut field: impl FnMut(&mut Self, usize, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        loop {
            let at = self.i;
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.key()?;
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            self.ws();
            field(self, at, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string at `self.i` (on its opening quote): the range of its contents, and whether
    /// it had no escapes.
    #[inline]
    pub(crate) fn string(&mut self) -> Option<(usize, usize, bool)> {
        let b = self.b;
        let start = self.i + 1;
        let mut i = start;
        let mut plain = true;
        loop {
            i = special(b, i, false);
            let c = *b.get(i)?;
            i += 1;
            match c {
                b'"' => {
                    self.i = i;
                    return Some((start, i - 1, plain));
                }
                b'\\' => {
                    plain = false;
                    match *b.get(i)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 1,
                        b'u' => {
                            let hex = b.get(i + 1..i + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            i += 5;
                        }
                        _ => return None,
                    }
                }
                // A control character.
                _ => return None,
            }
        }
    }

    /// A key at `self.i` (on its opening quote): its text, when it is ASCII without
    /// escapes (other keys are left to serde).
    #[inline]
    fn key(&mut self) -> Option<&'a [u8]> {
        let start = self.i + 1;
        let end = special(self.b, start, true);
        if self.b.get(end) != Some(&b'"') {
            return None;
        }
        self.i = end + 1;
        self.b.get(start..end)
    }

    /// Skips one value (the scanner is on its first byte), checking its syntax.
    fn value(&mut self, depth: u32) -> Option<()> {
        match *self.b.get(self.i)? {
            b'"' => self.string().map(|_| ()),
            b'{' => {
                if depth > MAX_DEPTH {
                    return None;
                }
                self.object(|s, _| s.value(depth + 1))
            }
            b'[' => {
                if depth > MAX_DEPTH {
                    return None;
                }
                self.array(|s| s.value(depth + 1))
            }
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A value's raw bytes, checked to be UTF-8 as serde's `RawValue` is.
    fn raw(&mut self, depth: u32) -> Option<&'a [u8]> {
        let start = self.i;
        self.value(depth)?;
        let raw = &self.b[start..self.i];
        if !raw.is_ascii() {
            std::str::from_utf8(raw).ok()?;
        }
        Some(raw)
    }

    /// A raw value's range, checked as [`Self::raw`] checks it.
    fn raw_range(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        self.raw(1)?;
        Some((start, self.i))
    }

    /// A value read as a raw value would be, and where its text is when it is a string
    /// without escapes (see `super::plain_string`; the caller checks the text is UTF-8).
    fn plain_string(&mut self) -> Option<Option<(usize, usize)>> {
        if self.b.get(self.i) == Some(&b'"') {
            let at = self.i;
            let (start, end, plain) = self.string()?;
            if plain {
                return Some(Some((start, end)));
            }
            self.i = at;
        }
        self.raw(1)?;
        Some(None)
    }

    /// A raw value, `None` for `null` (serde's `Option<&RawValue>`).
    fn opt_raw(&mut self) -> Option<Option<&'a [u8]>> {
        let raw = self.raw(2)?;
        Some((raw != b"null").then_some(raw))
    }

    /// `[ value, … ]`; `element` reads each (the scanner is on its first byte).
    #[inline]
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.i += 1;
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            element(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    pub(crate) fn literal(&mut self, lit: &[u8]) -> Option<()> {
        if self.b.get(self.i..self.i + lit.len())? != lit {
            return None;
        }
        self.i += lit.len();
        Some(())
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
        self.i - start
    }

    /// A JSON number: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let first = *self.b.get(self.i)?;
        let n = self.digits();
        if n == 0 || (first == b'0' && n > 1) {
            return None;
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// `null` or a plain non-negative integer that fits in a `u64` (anything else is left
    /// to serde, which knows which other spellings it accepts).
    pub(crate) fn opt_uint(&mut self) -> Option<Option<u64>> {
        if self.b.get(self.i) == Some(&b'n') {
            self.literal(b"null")?;
            return Some(None);
        }
        let start = self.i;
        let n = self.digits();
        let digits = &self.b[start..self.i];
        if n == 0 || (digits[0] == b'0' && n > 1) {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.b.get(self.i) {
            return None;
        }
        let mut v: u64 = 0;
        for d in digits {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        Some(Some(v))
    }

    /// Notes the value just read from `at` as the payload's content string (see [`Template`])
    /// when it is a string and the first one.
    #[inline]
    fn note_var(&mut self, at: usize) {
        if self.var.is_none() && self.b[at] == b'"' {
            self.var = Some((at, self.i - 1));
        }
    }

    /// `choices`: `null` or an array of choice objects.
    fn choices(&mut self, choices: &mut Vec<ChoiceInfo>) -> Option<()> {
        match *self.b.get(self.i)? {
            b'n' => self.literal(b"null"),
            b'[' => self.array(|s| {
                let info = s.choice()?;
                choices.push(info);
                Some(())
            }),
            _ => None,
        }
    }

    fn choice(&mut self) -> Option<ChoiceInfo> {
        if *self.b.get(self.i)? != b'{' {
            return None;
        }
        let mut index = None;
        let mut delta = None;
        let mut text = None;
        let mut finish = None;
        let keys: [&[u8]; 4] = [b"index", b"delta", b"text", b"finish_reason"];
        self.fields(&keys, 2, |s, k| {
            match k {
                0 => {
                    index = s.opt_uint()?;
                    if index.is_some_and(|i| i > u64::from(u32::MAX)) {
                        return None;
                    }
                }
                1 => delta = Some(s.delta()?),
                2 => {
                    let at = s.i;
                    text = s.opt_raw()?;
                    s.note_var(at);
                }
                _ => finish = s.opt_raw()?,
            }
            Some(())
        })?;
        // Without a `delta` it is a completions choice: bench counts every one, empty `text`
        // included.
        let (output, answer, reasoning) = delta.unwrap_or((true, non_empty(text), false));
        Some(ChoiceInfo {
            index: index.map_or(0, |i| i as u32),
            output,
            answer,
            reasoning,
            finish_reason: finish_reason(finish),
        })
    }

    /// `delta`: `null` or an object; whether it streamed output, carried answer text and
    /// carried reasoning (see [`delta_output`]).
    fn delta(&mut self) -> Option<(bool, bool, bool)> {
        match *self.b.get(self.i)? {
            b'n' => {
                self.literal(b"null")?;
                Some((false, false, false))
            }
            b'{' => {
                let mut d = DeltaFields::default();
                let keys: [&[u8]; 6] = [
                    b"content",
                    b"reasoning_content",
                    b"reasoning",
                    b"tool_calls",
                    b"role",
                    b"function_call",
                ];
                self.fields(&keys, 3, |s, k| {
                    let at = s.i;
                    let v = s.opt_raw()?;
                    match k {
                        0 => {
                            d.content = v;
                            s.note_var(at);
                        }
                        1 => d.reasoning_content = v,
                        2 => d.reasoning = v,
                        3 => d.tool_calls = v,
                        4 => d.role = v,
                        _ => d.function_call = v,
                    }
                    Some(())
                })?;
                Some(delta_output(&d))
            }
            _ => None,
        }
    }

    /// `usage`: `null` or an object with optional integer token counts.
    fn usage(&mut self) -> Option<Option<Usage>> {
        match *self.b.get(self.i)? {
            b'n' => {
                self.literal(b"null")?;
                Some(None)
            }
            b'{' => {
                let mut u = Usage::default();
                let keys: [&[u8]; 4] = [
                    b"prompt_tokens",
                    b"completion_tokens",
                    b"prompt_tokens_details",
                    b"completion_tokens_details",
                ];
                self.fields(&keys, 2, |s, k| {
                    match k {
                        0 => u.prompt_tokens = s.opt_uint()?,
                        1 => u.completion_tokens = s.opt_uint()?,
                        // The details: `null` (vLLM without `--enable-prompt-tokens-details`,
                        // a model that does not reason) or an object; anything unusual
                        // declines, and the serde reading answers leniently.
                        _ if s.peek()? == b'n' => s.literal(b"null")?,
                        2 => s.fields(&[b"cached_tokens"], 3, |s, _| {
                            u.cached_prompt_tokens = s.opt_uint()?;
                            Some(())
                        })?,
                        _ => s.fields(&[b"reasoning_tokens"], 3, |s, _| {
                            u.reasoning_tokens = s.opt_uint()?;
                            Some(())
                        })?,
                    }
                    Some(())
                })?;
                Some(Some(u))
            }
            _ => None,
        }
    }
}
