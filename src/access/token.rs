//! The tokens berth's token service issues: compact JWTs signed with HMAC-SHA256, and the clock
//! that dates them. Issuing and verifying are pure functions of a key, the claims and `now`.
//!
//! Only berth reads these tokens, so only one algorithm exists: the header must say `HS256`,
//! which rules out `none` and algorithm confusion. The signature is checked (constant time,
//! `ring::hmac::verify`) before the claims are even parsed. A hand-written JWT of this one shape
//! is ~50 lines over `ring`, which berth already uses for TLS; `jsonwebtoken` would add a second
//! crypto stack and read the system clock, which tests could not move.
//!
//! The key is `access.token_key` when configured, so several berth instances behind one name
//! accept each other's tokens, or random per process otherwise (tokens then die with it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// Who issues and who accepts the tokens: the `service` of berth's challenge.
pub const SERVICE: &str = "berth";

/// Tokens come from clients; a real one is a few hundred bytes.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Instances sharing a `token_key` may disagree slightly about the time; a token dated a little
/// in the future is accepted. Expiry gets no leeway: tokens are short and re-fetched.
const SKEW: u64 = 60;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

pub struct TokenKey(hmac::Key);

impl TokenKey {
    pub fn new(secret: &[u8]) -> TokenKey {
        TokenKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    pub fn random() -> TokenKey {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        TokenKey::new(&secret)
    }
}

/// One grant, in the distribution token spec's form. `name` is the full repository berth
/// resolved (`docker.io/library/nginx`), so a token means the same whatever path or `ns` the
/// client uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The principal's link, `//serviceaccount/ci` or `//user/EMAIL`.
    pub sub: String,
    /// Which of the principal's keys minted the token (`KeyHash::id`): the token is good only
    /// while the principal still has that key.
    pub kid: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    pub access: Vec<Grant>,
}

impl Claims {
    pub(crate) fn grants_pull(&self, repository: &str) -> bool {
        self.access.iter().any(|grant| {
            grant.kind == "repository"
                && grant.name == repository
                && grant.actions.iter().any(|a| a == "pull")
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    Early,
    #[error("token is for another service")]
    Audience,
}

pub fn issue(key: &TokenKey, claims: &Claims) -> String {
    let payload = serde_json::to_vec(claims).expect("claims serialise");
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = hmac::sign(&key.0, signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

/// Checks the signature, then the audience and the validity window at `now` (unix seconds).
pub fn verify(key: &TokenKey, token: &str, now: u64) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed)?;
    let signing_input = &token[..header.len() + 1 + payload.len()];
    hmac::verify(&key.0, signing_input.as_bytes(), &signature)
        .map_err(|_| TokenError::Signature)?;
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let header: Header = decode_json(header)?;
    if header.alg != "HS256" {
        return Err(TokenError::Malformed);
    }
    let claims: Claims = decode_json(payload)?;
    if claims.aud != SERVICE || claims.iss != SERVICE {
        return Err(TokenError::Audience);
    }
    if now >= claims.exp {
        return Err(TokenError::Expired);
    }
    if claims.nbf > now + SKEW {
        return Err(TokenError::Early);
    }
    Ok(claims)
}

/// The `sub` a token claims, read without checking its signature: only a name to count
/// failures of an invalid token under, never an identity.
pub(crate) fn claimed_subject(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    #[derive(Deserialize)]
    struct Subject {
        sub: String,
    }
    let payload = token.split('.').nth(1)?;
    decode_json::<Subject>(payload)
        .ok()
        .map(|claims| claims.sub)
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// Wall-clock time that moves with tokio's clock: the time at start plus tokio's elapsed time.
/// In production tokio's clock is the monotonic clock (NTP slews it, never steps it), so this is
/// the wall clock; under `tokio::time::pause` tests move it with `advance` to age tokens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall: SystemTime,
    at: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            wall: SystemTime::now(),
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.wall + self.at.elapsed()
    }

    /// Seconds since the Unix epoch, as JWT dates are written.
    pub fn unix(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: u64, ttl: u64) -> Claims {
        Claims {
            iss: SERVICE.into(),
            aud: SERVICE.into(),
            sub: "//serviceaccount/ci".into(),
            kid: "0123456789abcdef".into(),
            iat: now,
            nbf: now,
            exp: now + ttl,
            jti: "j".into(),
            access: vec![Grant {
                kind: "repository".into(),
                name: "docker.io/library/nginx".into(),
                actions: vec!["pull".into()],
            }],
        }
    }

    #[test]
    fn issued_tokens_verify_until_they_expire() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let token = issue(&key, &claims(1000, 300));
        let verified = verify(&key, &token, 1000).unwrap();
        assert!(verified.grants_pull("docker.io/library/nginx"));
        assert!(!verified.grants_pull("docker.io/library/redis"));
        assert_eq!(verify(&key, &token, 1299).unwrap(), verified);
        assert_eq!(verify(&key, &token, 1300), Err(TokenError::Expired));
        assert_eq!(verify(&key, &token, 900), Err(TokenError::Early));
        assert!(
            verify(&key, &token, 1000 - SKEW).is_ok(),
            "small skew is fine"
        );
    }

    #[test]
    fn tokens_of_another_key_or_tampered_ones_are_refused() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let other = TokenKey::random();
        let token = issue(&key, &claims(1000, 300));
        assert_eq!(verify(&other, &token, 1000), Err(TokenError::Signature));
        let mut forged = claims(1000, 300);
        forged.access[0].name = "secret/app".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_payload;
        assert_eq!(
            verify(&key, &parts.join("."), 1000),
            Err(TokenError::Signature)
        );
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(verify(&key, bad, 1000).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unsigned_and_foreign_algorithms_are_refused() {
        let key = TokenKey::new(b"k");
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(1000, 300)).unwrap());
        let none = format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#));
        assert_eq!(verify(&key, &none, 1000), Err(TokenError::Signature));
        // Even correctly MACed, a header naming another algorithm is not ours.
        let input = format!("{}.{payload}", URL_SAFE_NO_PAD.encode(r#"{"alg":"HS512"}"#));
        let signature = hmac::sign(&key.0, input.as_bytes());
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
        assert_eq!(verify(&key, &token, 1000), Err(TokenError::Malformed));
    }

    #[test]
    fn another_audience_is_refused() {
        let key = TokenKey::new(b"k");
        let mut other = claims(1000, 300);
        other.aud = "registry.example".into();
        assert_eq!(
            verify(&key, &issue(&key, &other), 1000),
            Err(TokenError::Audience)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_paused_time() {
        let clock = Clock::new();
        let start = clock.unix();
        tokio::time::advance(Duration::from_secs(301)).await;
        assert_eq!(clock.unix(), start + 301);
    }
}
