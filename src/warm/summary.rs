//! What `berth warm` reports: the summary of a run, and `printable`, which every text a target
//! sent passes through before it reaches a terminal.

use std::collections::BTreeMap;
use std::fmt;

/// The `X-Cache` values berth sends; anything else a target sends is tallied as `other`.
pub(super) const OUTCOMES: [&str; 8] = [
    "HIT",
    "MISS",
    "COALESCED",
    "REVALIDATED",
    "STALE",
    "BYPASS",
    "DENIED",
    "ERROR",
];

/// `text` with control characters (terminal escapes, carriage returns, newlines) shown as
/// `\u{..}` escapes, and cut at 1024 characters: what a target sent may be printed to a
/// terminal, which must not execute it.
pub fn printable(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == 1024 {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// What one warm run did, for the summary line.
#[derive(Debug, Default)]
pub struct Summary {
    pub images: usize,
    pub failed: Vec<(String, String)>,
    pub blobs: usize,
    pub bytes: u64,
    pub seconds: f64,
    /// `X-Cache` values of every manifest and blob response.
    pub outcomes: BTreeMap<String, usize>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(outcome, n)| format!("{outcome}={n}"))
            .collect();
        write!(
            f,
            "warmed {} image(s), {} blob(s), {} in {:.1}s ({}/s); cache outcomes: {}",
            self.images,
            self.blobs,
            bytesize::ByteSize::b(self.bytes).display().iec(),
            self.seconds,
            bytesize::ByteSize::b((self.bytes as f64 / self.seconds.max(0.001)) as u64)
                .display()
                .iec(),
            if outcomes.is_empty() {
                "none".to_string()
            } else {
                outcomes.join(" ")
            },
        )?;
        for (reference, error) in &self.failed {
            write!(f, "\nfailed {}: {}", printable(reference), printable(error))?;
        }
        Ok(())
    }
}
