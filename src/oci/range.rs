//! The `Range` request header for blob GETs (RFC 9110 §14), reduced to what
//! a blob server needs: one byte range or the whole blob.
//!
//! Owns: parsing `Range` against a known blob size, and formatting the
//! matching `Content-Range` values.
//!
//! Does not own: deciding whether to honour ranges at all (HEAD, `If-Range`,
//! a blob still being filled whose size is unknown), or writing the 206/416
//! response; the blob route does that with the `RangeRequest` returned here.
//!
//! Choices, all permitted by RFC 9110 §14.2 ("a server MAY ignore the Range
//! header field"):
//! - Multiple ranges are served as `Full`: multipart/byteranges buys clients
//!   pulling layers nothing, and no registry client asks for it.
//! - Anything malformed (unknown unit, bad numbers, `last < first`) is
//!   `Full`, as the RFC requires for an invalid range-set.
//! - A zero-length blob is always `Full`. The RFC calls a non-zero suffix
//!   range on it satisfiable yet there is no byte to put in a 206, and a
//!   416 for `bytes=0-` would turn a trivially servable pull into an error
//!   for clients that always send a range; an empty 200 is correct for
//!   every request.

/// An inclusive byte range `start..=end` within a blob. `parse_range` only
/// returns ranges with `start <= end < size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// What to send for a GET, given its `Range` header and the blob size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeRequest {
    /// 200 with the whole blob.
    Full,
    /// 206 with `Content-Range: ByteRange::content_range(size)`.
    Partial(ByteRange),
    /// 416 with `Content-Range: unsatisfied_content_range(size)`.
    Unsatisfiable,
}

// A range is never empty (both ends are inclusive), so `is_empty` would
// always be false and only mislead.
#[allow(clippy::len_without_is_empty)]
impl ByteRange {
    /// Number of bytes in the range, for `Content-Length`.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// `Content-Range` value for a 206: `bytes 0-99/1000`.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{size}", self.start, self.end)
    }
}

/// `Content-Range` value for a 416: `bytes */1000`.
pub(crate) fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

/// Interprets a `Range` header against a blob of `size` bytes.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(header) = header else {
        return RangeRequest::Full;
    };
    if size == 0 {
        return RangeRequest::Full;
    }
    match parse_single_byte_range(header) {
        Some(spec) => spec.resolve(size),
        None => RangeRequest::Full,
    }
}

/// A syntactically valid range-spec, before it meets the blob size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    /// `first-` or `first-last`
    From { first: u64, last: Option<u64> },
    /// `-length`: the final `length` bytes.
    Suffix(u64),
}

impl Spec {
    fn resolve(self, size: u64) -> RangeRequest {
        // Callers guarantee size > 0, so `size - 1` cannot underflow.
        let last_byte = size - 1;
        match self {
            Spec::From { first, .. } if first >= size => RangeRequest::Unsatisfiable,
            Spec::From { first, last } => RangeRequest::Partial(ByteRange {
                start: first,
                end: last.map_or(last_byte, |l| l.min(last_byte)),
            }),
            Spec::Suffix(0) => RangeRequest::Unsatisfiable,
            Spec::Suffix(len) => RangeRequest::Partial(ByteRange {
                start: size.saturating_sub(len),
                end: last_byte,
            }),
        }
    }
}

/// `bytes=<one range-spec>`, or `None` for anything we choose to ignore.
fn parse_single_byte_range(header: &str) -> Option<Spec> {
    let (unit, set) = header.trim().split_once('=')?;
    // Range units are case-insensitive (RFC 9110 §14.1).
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    // `1#range-spec` list syntax: recipients must skip empty elements
    // (RFC 9110 §5.6.1), so `bytes=0-1,` is still one range.
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let spec = specs.next()?;
    if specs.next().is_some() {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    if first.is_empty() {
        return Some(Spec::Suffix(parse_digits(last)?));
    }
    let first = parse_digits(first)?;
    let last = if last.is_empty() {
        None
    } else {
        Some(parse_digits(last)?)
    };
    // An int-range with last < first is invalid, and so is the whole set.
    if last.is_some_and(|l| l < first) {
        return None;
    }
    Some(Spec::From { first, last })
}

/// `1*DIGIT`, saturating at `u64::MAX`: a position past any real blob is
/// still well-formed, and saturating gives the right answer for it
/// (unsatisfiable start, clamped end, whole-blob suffix).
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn part(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn interprets_range_headers() {
        use RangeRequest::{Full, Unsatisfiable};
        let huge = "9".repeat(40);
        let from_huge = format!("bytes={huge}-");
        let to_huge = format!("bytes=5-{huge}");
        let suffix_huge = format!("bytes=-{huge}");
        let cases: &[(Option<&str>, u64, RangeRequest)] = &[
            (None, 1000, Full),
            (Some("bytes=0-99"), 1000, part(0, 99)),
            (Some("bytes=0-0"), 1000, part(0, 0)),
            (Some("bytes=999-999"), 1000, part(999, 999)),
            (Some("bytes=100-"), 1000, part(100, 999)),
            (Some("bytes=0-"), 1000, part(0, 999)),
            (Some("bytes=-500"), 1000, part(500, 999)),
            (Some("bytes=-1000"), 1000, part(0, 999)),
            (Some("bytes=-5000"), 1000, part(0, 999)),
            (Some("bytes=-1"), 1000, part(999, 999)),
            (Some("bytes=900-5000"), 1000, part(900, 999)),
            (Some(&to_huge), 1000, part(5, 999)),
            (Some(&suffix_huge), 1000, part(0, 999)),
            // Case-insensitive unit, optional whitespace, empty list items.
            (Some("Bytes=1-2"), 1000, part(1, 2)),
            (Some("BYTES=1-2"), 1000, part(1, 2)),
            (Some("  bytes=1-2  "), 1000, part(1, 2)),
            (Some("bytes= 1-2 "), 1000, part(1, 2)),
            (Some("bytes=1-2,"), 1000, part(1, 2)),
            (Some("bytes=, ,1-2"), 1000, part(1, 2)),
            // Unsatisfiable: nothing of the blob is selected.
            (Some("bytes=1000-"), 1000, Unsatisfiable),
            (Some("bytes=1000-2000"), 1000, Unsatisfiable),
            (Some(&from_huge), 1000, Unsatisfiable),
            (Some("bytes=-0"), 1000, Unsatisfiable),
            // Ignored: multiple ranges, malformed, other units.
            (Some("bytes=0-1,5-6"), 1000, Full),
            (Some("bytes=0-1,2000-"), 1000, Full),
            (Some("bytes=5-4"), 1000, Full),
            (Some("bytes="), 1000, Full),
            (Some("bytes=,"), 1000, Full),
            (Some("bytes=-"), 1000, Full),
            (Some("bytes=--5"), 1000, Full),
            (Some("bytes=+1-2"), 1000, Full),
            (Some("bytes=1 - 2"), 1000, Full),
            (Some("bytes=0x10-"), 1000, Full),
            (Some("bytes=1-2-3"), 1000, Full),
            (Some("bytes=a-b"), 1000, Full),
            (Some("bytes 0-1"), 1000, Full),
            (Some("items=0-1"), 1000, Full),
            (Some("bytesx=0-1"), 1000, Full),
            (Some("=0-1"), 1000, Full),
            (Some(""), 1000, Full),
            (Some("bytes=１-2"), 1000, Full),
            // Empty blob: always the (empty) whole.
            (Some("bytes=0-"), 0, Full),
            (Some("bytes=-5"), 0, Full),
            (Some("bytes=5-9"), 0, Full),
            (None, 0, Full),
            // One-byte blob.
            (Some("bytes=0-"), 1, part(0, 0)),
            (Some("bytes=-9"), 1, part(0, 0)),
            (Some("bytes=1-"), 1, Unsatisfiable),
            // Largest representable blob.
            (Some("bytes=0-"), u64::MAX, part(0, u64::MAX - 1)),
            (Some(&to_huge), u64::MAX, part(5, u64::MAX - 1)),
        ];
        for (header, size, want) in cases {
            assert_eq!(parse_range(*header, *size), *want, "{header:?} size {size}");
        }
    }

    #[test]
    fn formats_content_range() {
        let r = ByteRange { start: 0, end: 99 };
        assert_eq!(r.len(), 100);
        assert_eq!(r.content_range(1000), "bytes 0-99/1000");
        assert_eq!(ByteRange { start: 7, end: 7 }.len(), 1);
        assert_eq!(unsatisfied_content_range(1000), "bytes */1000");
    }

    proptest! {
        #[test]
        fn partial_ranges_lie_within_the_blob(header in "\\PC*", size in any::<u64>()) {
            check_within(&header, size)?;
        }

        #[test]
        fn partial_ranges_lie_within_the_blob_for_range_like_headers(
            header in "(bytes|BYTES|x)=[ ,]?[0-9]{0,21}-?[0-9]{0,21}(,[0-9]{0,3}-[0-9]{0,3})?",
            size in prop_oneof![0..2000u64, any::<u64>()],
        ) {
            check_within(&header, size)?;
        }

        #[test]
        fn satisfiable_single_ranges_are_honoured(size in 1..10_000u64, a in 0..10_000u64, b in 0..10_000u64) {
            let (first, last) = (a.min(b), a.max(b));
            let got = parse_range(Some(&format!("bytes={first}-{last}")), size);
            if first < size {
                prop_assert_eq!(got, part(first, last.min(size - 1)));
            } else {
                prop_assert_eq!(got, RangeRequest::Unsatisfiable);
            }
        }
    }

    fn check_within(header: &str, size: u64) -> Result<(), TestCaseError> {
        if let RangeRequest::Partial(r) = parse_range(Some(header), size) {
            prop_assert!(r.start <= r.end, "{r:?}");
            prop_assert!(r.end < size, "{r:?} size {size}");
            prop_assert!(r.len() <= size);
        }
        Ok(())
    }
}
