//! The peer token: the shared secret that marks a request as coming from another replica of
//! the location. The file holds one token a line and every line is accepted, so a token is
//! rotated without a moment where two replicas disagree: add the new line everywhere, switch,
//! remove the old one. The first line is the one this replica sends.
//!
//! Comparison is constant-time over SHA-256 digests of the tokens, so neither the content nor
//! the length of a token leaks through timing. Reading the file is the only I/O here: it is
//! re-read when it changes (`TokenFile`, checked at most every `RECHECK`), so a rotation needs
//! no restart; a file that turns unreadable or invalid keeps the last good tokens.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;
use crate::stamp::Stamp;

/// The header a peer request carries its token in (never the client's `Authorization`, which
/// the policy mode reads as a client key).
pub const PEER_TOKEN_HEADER: &str = "x-berth-peer-token";

/// How often the token file is looked at (one `stat`) when tokens are used.
const RECHECK: Duration = Duration::from_secs(1);

/// A token file is a few lines; a larger one is not read.
const MAX_FILE: u64 = 64 * 1024;

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
    #[error("cluster.token_file: larger than {MAX_FILE} bytes")]
    TooLarge,
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
    /// Reads at most `MAX_FILE` bytes: a larger file is refused, however it grows meanwhile.
    pub fn load(path: &Path) -> Result<PeerTokens, TokenError> {
        use std::io::Read;
        let read_error = |source| TokenError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_FILE + 1).read_to_string(&mut text))
            .map_err(read_error)?;
        if text.len() as u64 > MAX_FILE {
            return Err(TokenError::TooLarge);
        }
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

/// The token file and the tokens it held when last read, re-read when its stamp changes.
pub struct TokenFile {
    path: PathBuf,
    recheck: Duration,
    state: Mutex<TokenState>,
}

struct TokenState {
    checked: Instant,
    stamp: Option<Stamp>,
    tokens: Arc<PeerTokens>,
}

impl TokenFile {
    /// Reads the file; a missing, unreadable or invalid file is refused (at start-up).
    pub fn open(path: &Path) -> Result<TokenFile, TokenError> {
        TokenFile::with_recheck(path, RECHECK)
    }

    pub fn with_recheck(path: &Path, recheck: Duration) -> Result<TokenFile, TokenError> {
        let stamp = Stamp::of(path).ok();
        let tokens = Arc::new(PeerTokens::load(path)?);
        Ok(TokenFile {
            path: path.to_owned(),
            recheck,
            state: Mutex::new(TokenState {
                checked: Instant::now(),
                stamp,
                tokens,
            }),
        })
    }

    /// The tokens in force, re-reading the file first if it changed since it was last read.
    pub fn current(&self) -> Arc<PeerTokens> {
        let mut state = self.state.lock().expect("token file lock");
        if state.checked.elapsed() < self.recheck {
            return Arc::clone(&state.tokens);
        }
        state.checked = Instant::now();
        let stamp = Stamp::of(&self.path).ok();
        if stamp.is_none() || stamp == state.stamp {
            return Arc::clone(&state.tokens);
        }
        state.stamp = stamp;
        let loaded = match stamp.is_some_and(|s| s.file_len() > MAX_FILE) {
            true => Err(format!("larger than {MAX_FILE} bytes")),
            false => PeerTokens::load(&self.path).map_err(|e| e.to_string()),
        };
        match loaded {
            Ok(tokens) => {
                tracing::info!(
                    accepted = tokens.accepted.len(),
                    "cluster.token_file re-read"
                );
                state.tokens = Arc::new(tokens);
            }
            Err(error) => {
                tracing::warn!(%error, "cluster.token_file changed but cannot be used; keeping the tokens in force");
            }
        }
        Arc::clone(&state.tokens)
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
    fn a_token_file_over_the_bound_is_refused_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let line = format!("{NEW}\n");
        std::fs::write(&path, line.repeat(MAX_FILE as usize / line.len() + 1)).unwrap();
        assert!(matches!(TokenFile::open(&path), Err(TokenError::TooLarge)));
    }

    #[test]
    fn a_rotated_file_is_read_again_without_a_restart_and_a_broken_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{OLD}\n")).unwrap();
        let file = TokenFile::with_recheck(&path, Duration::ZERO).unwrap();
        assert!(!file.current().accepts(NEW.as_bytes()));
        std::fs::write(&path, format!("{NEW}\n{OLD}\n")).unwrap();
        assert!(file.current().accepts(NEW.as_bytes()));
        assert!(file.current().accepts(OLD.as_bytes()));
        assert_eq!(file.current().to_send().expose(), NEW);
        std::fs::write(&path, format!("{NEW}\n")).unwrap();
        assert!(!file.current().accepts(OLD.as_bytes()));
        // A half-written or emptied file keeps the tokens in force.
        std::fs::write(&path, "short\n").unwrap();
        assert!(file.current().accepts(NEW.as_bytes()));
        std::fs::remove_file(&path).unwrap();
        assert!(file.current().accepts(NEW.as_bytes()));
    }

    #[test]
    fn the_token_never_prints() {
        let tokens = PeerTokens::parse(OLD).unwrap();
        assert!(!format!("{tokens:?}").contains("old-token"));
    }
}
