//! The peer token: the shared secret that marks a request as coming from another replica of
//! the location. The file holds one token a line and every line is accepted, so a token is
//! rotated without a moment where two replicas disagree: add the new line everywhere, switch,
//! remove the old one. The first line is the one this replica sends.
//!
//! Comparison is constant-time over SHA-256 digests of the tokens, so neither the content nor
//! the length of a token leaks through timing. Reading the file is the only I/O here.

use std::path::Path;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// The header a peer request carries its token in (never the client's `Authorization`, which
/// the policy mode reads as a client key).
pub const PEER_TOKEN_HEADER: &str = "x-berth-peer-token";

/// Shorter tokens are refused at start-up: a guessable peer token bypasses per-client limits.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read cluster.token_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cluster.token_file: line {line} is shorter than {MIN_TOKEN_LEN} characters or not visible ASCII")]
    Short { line: usize },
    #[error("cluster.token_file: no token in the file")]
    Empty,
}

/// The accepted tokens (as digests) and the one to send.
pub struct PeerTokens {
    accepted: Vec<[u8; 32]>,
    send: Secret,
}

impl std::fmt::Debug for PeerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PeerTokens({} accepted, <redacted>)",
            self.accepted.len()
        )
    }
}

impl PeerTokens {
    pub fn load(path: &Path) -> Result<PeerTokens, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        PeerTokens::parse(&text)
    }

    /// One token a line; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<PeerTokens, TokenError> {
        let mut accepted = Vec::new();
        let mut send = None;
        for (i, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            // It travels in a header: visible ASCII only.
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenError::Short { line: i + 1 });
            }
            accepted.push(hashed(token.as_bytes()));
            send.get_or_insert_with(|| Secret::new(token));
        }
        let send = send.ok_or(TokenError::Empty)?;
        Ok(PeerTokens { accepted, send })
    }

    /// The token this replica presents to its peers.
    pub fn to_send(&self) -> &Secret {
        &self.send
    }

    /// Whether `presented` is one of the accepted tokens. Every accepted token is compared,
    /// whichever matches, so the time taken says nothing about which one or how close.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let presented = hashed(presented);
        let mut matched = subtle::Choice::from(0);
        for token in &self.accepted {
            matched |= token.ct_eq(&presented);
        }
        matched.into()
    }
}

fn hashed(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "old-token-0123456789";
    const NEW: &str = "new-token-0123456789";

    #[test]
    fn every_line_is_accepted_and_the_first_is_sent() {
        let tokens = PeerTokens::parse(&format!("# rotating\n{NEW}\n\n{OLD}\n")).unwrap();
        assert!(tokens.accepts(NEW.as_bytes()));
        assert!(tokens.accepts(OLD.as_bytes()));
        assert_eq!(tokens.to_send().expose(), NEW);
    }

    #[test]
    fn a_wrong_token_or_a_prefix_is_refused() {
        let tokens = PeerTokens::parse(OLD).unwrap();
        assert!(!tokens.accepts(b"old-token-012345678"));
        assert!(!tokens.accepts(b"old-token-0123456789x"));
        assert!(!tokens.accepts(b""));
    }

    #[test]
    fn a_short_token_or_an_empty_file_is_refused_at_start_up() {
        assert!(matches!(
            PeerTokens::parse("short"),
            Err(TokenError::Short { line: 1 })
        ));
        assert!(matches!(
            PeerTokens::parse("# nothing\n"),
            Err(TokenError::Empty)
        ));
    }

    #[test]
    fn the_token_never_prints() {
        let tokens = PeerTokens::parse(OLD).unwrap();
        assert!(!format!("{tokens:?}").contains("old-token"));
    }
}
