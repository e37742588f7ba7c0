//! Principals: service accounts and users with the hashes of their keys, and groups of them.
//! Parsing the principals file and checking a presented key; no files, no requests.
//!
//! Keys are stored as salted SHA-256 (`$sha256$<salt hex>$<hash hex>`, printed by
//! `berth hash-key`). That is the right cost for what keys are: random tokens of 128 bits or
//! more, which no hash speed makes guessable, so a slow password hash (argon2) would only add
//! tens of milliseconds and megabytes to every request that carries Basic credentials, and
//! containerd sends them on every blob request. It would be the wrong choice for passwords a
//! person picks; `berth hash-key` refuses short keys and `--generate` makes proper ones.
//!
//! Checking walks every candidate key and compares digests in constant time (`subtle`), and an
//! unknown user costs the same hashing as a known one, so timing tells nothing about which key
//! or user exists.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::policy::{PrincipalLink, RuleError};

/// The username a service-account key is presented with, as the platform's registry has it.
pub(crate) const SERVICE_ACCOUNT_USER: &str = "<token>";

/// Keys shorter than this are refused by `berth hash-key`: they are not random tokens.
pub const MIN_KEY_LEN: usize = 20;

const SALT_LEN: usize = 16;

/// A new random key: 32 bytes from a CSPRNG seeded by the OS (`rand`), base64url (43 characters).
pub fn generate_key() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A stored key: salt and SHA-256 of salt followed by the key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash {
    salt: [u8; SALT_LEN],
    hash: [u8; 32],
}

impl KeyHash {
    /// Hashes a key with a fresh random salt.
    pub fn generate(key: &str) -> KeyHash {
        let mut salt = [0u8; SALT_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
        KeyHash {
            salt,
            hash: salted(&salt, key.as_bytes()),
        }
    }

    pub fn parse(text: &str) -> Result<KeyHash, KeyHashError> {
        let bad = |_| KeyHashError;
        let rest = text.strip_prefix("$sha256$").ok_or(KeyHashError)?;
        let (salt, hash) = rest.split_once('$').ok_or(KeyHashError)?;
        let mut parsed = KeyHash {
            salt: [0; SALT_LEN],
            hash: [0; 32],
        };
        hex::decode_to_slice(salt, &mut parsed.salt).map_err(bad)?;
        hex::decode_to_slice(hash, &mut parsed.hash).map_err(bad)?;
        Ok(parsed)
    }

    /// A short name for this stored key that tokens carry, so removing the key from the file
    /// revokes them: derived from the salted hash (which is random per key), so it says nothing
    /// about the key itself.
    pub fn id(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"berth key id\0");
        hasher.update(self.salt);
        hasher.update(self.hash);
        hex::encode(&hasher.finalize()[..8])
    }

    /// Whether `key` hashes to this; the digests are compared in constant time.
    pub fn verify(&self, key: &[u8]) -> bool {
        bool::from(salted(&self.salt, key).ct_eq(&self.hash))
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$sha256${}${}",
            hex::encode(self.salt),
            hex::encode(self.hash)
        )
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(<redacted>)")
    }
}

fn salted(salt: &[u8], key: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(key);
    hasher.finalize().into()
}

#[derive(Debug, Clone)]
struct Key {
    /// What the operator calls the key (`laptop`, `ci-2025`); logs and reports may show it.
    name: Option<String>,
    hash: KeyHash,
}

#[derive(Debug, Clone)]
struct Account {
    link: PrincipalLink,
    keys: Vec<Key>,
}

/// Everyone who can authenticate to berth, and the groups policies may bind to.
#[derive(Debug, Clone, Default)]
pub struct Principals {
    service_accounts: Vec<Account>,
    users: Vec<Account>,
    groups: BTreeMap<String, Vec<PrincipalLink>>,
}

/// Who a key belongs to, and which of their keys it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub principal: PrincipalLink,
    pub(crate) key_name: Option<String>,
    /// `KeyHash::id` of the key, which tokens minted with it carry.
    pub(crate) key_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    service_accounts: Vec<RawServiceAccount>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    groups: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceAccount {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    email: String,
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    #[serde(default)]
    name: Option<String>,
    hash: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawGroup {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    member_links: Vec<String>,
}

/// A stored key hash that is not in `berth hash-key`'s form (the hash itself is never shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a key hash looks like $sha256$<32 hex>$<64 hex> (berth hash-key)")]
pub struct KeyHashError;

/// Why the principals file does not load: its JSON, a link, or an entry (named, without hashes).
#[derive(Debug, thiserror::Error)]
pub enum PrincipalsError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Link(#[from] RuleError),
    #[error("{link}: members are users and service accounts, not {member}")]
    NotAMember {
        link: PrincipalLink,
        member: PrincipalLink,
    },
    #[error("{link}: member {member} is not defined in this file")]
    UnknownMember {
        link: PrincipalLink,
        member: PrincipalLink,
    },
    #[error("{0} is defined twice")]
    Twice(PrincipalLink),
    #[error("{owner} key {index}: {source}")]
    Key {
        owner: PrincipalLink,
        index: usize,
        #[source]
        source: KeyHashError,
    },
}

impl Principals {
    /// Parses the principals file. Errors name the entry and never include a hash.
    pub fn parse(bytes: &[u8], org: Option<&str>) -> Result<Principals, PrincipalsError> {
        let raw: RawFile = serde_json::from_slice(bytes)?;
        let mut principals = Principals::default();
        for sa in raw.service_accounts {
            let _ = sa.description;
            let link = PrincipalLink::parse(&format!("//serviceaccount/{}", sa.name), None)?;
            let keys = parse_keys(sa.keys, &link)?;
            principals.add(link, keys, true)?;
        }
        for user in raw.users {
            let link = PrincipalLink::parse(&format!("//user/{}", user.email), None)?;
            let keys = parse_keys(user.keys, &link)?;
            principals.add(link, keys, false)?;
        }
        for group in raw.groups {
            let _ = group.description;
            let link = PrincipalLink::parse(&format!("//group/{}", group.name), None)?;
            let mut members = Vec::new();
            for member in &group.member_links {
                let member = PrincipalLink::parse(member, org)?;
                if !matches!(
                    member,
                    PrincipalLink::User(_) | PrincipalLink::ServiceAccount(_)
                ) {
                    return Err(PrincipalsError::NotAMember { link, member });
                }
                if !principals.contains(&member) {
                    return Err(PrincipalsError::UnknownMember { link, member });
                }
                members.push(member);
            }
            if principals.groups.insert(group.name, members).is_some() {
                return Err(PrincipalsError::Twice(link));
            }
        }
        Ok(principals)
    }

    fn add(
        &mut self,
        link: PrincipalLink,
        keys: Vec<Key>,
        service: bool,
    ) -> Result<(), PrincipalsError> {
        if self.contains(&link) {
            return Err(PrincipalsError::Twice(link));
        }
        let list = if service {
            &mut self.service_accounts
        } else {
            &mut self.users
        };
        list.push(Account { link, keys });
        Ok(())
    }

    /// Whether a user or service account is defined.
    pub fn contains(&self, link: &PrincipalLink) -> bool {
        self.service_accounts
            .iter()
            .chain(&self.users)
            .any(|account| &account.link == link)
    }

    /// Who presents `key` as `username`: `<token>` and a service account's key, or a user's
    /// email and one of their keys. Every candidate key is checked, whatever matched first.
    pub fn verify(&self, username: &str, key: &[u8]) -> Option<Verified> {
        let candidates: Vec<&Account> = if username == SERVICE_ACCOUNT_USER {
            self.service_accounts.iter().collect()
        } else {
            let link = PrincipalLink::User(username.to_lowercase());
            self.users.iter().filter(|a| a.link == link).collect()
        };
        if candidates.is_empty() {
            // An unknown user costs the same hashing as a known one.
            let _ = dummy_hash().verify(key);
            return None;
        }
        let mut found: Vec<Verified> = Vec::new();
        for account in candidates {
            for stored in &account.keys {
                if stored.hash.verify(key) {
                    found.push(Verified {
                        principal: account.link.clone(),
                        key_name: stored.name.clone(),
                        key_id: stored.hash.id(),
                    });
                }
            }
        }
        // The same key stored for two service accounts says nothing about who is asking.
        match found.len() {
            1 => found.pop(),
            _ => None,
        }
    }

    /// Whether the principal still has the key `key_id` names (`KeyHash::id`).
    pub(crate) fn has_key(&self, principal: &PrincipalLink, key_id: &str) -> bool {
        self.service_accounts
            .iter()
            .chain(&self.users)
            .filter(|account| &account.link == principal)
            .flat_map(|account| &account.keys)
            .any(|key| key.hash.id() == key_id)
    }

    /// The groups a user or service account belongs to.
    pub(crate) fn groups_of(&self, principal: &PrincipalLink) -> Vec<&str> {
        self.groups
            .iter()
            .filter(|(_, members)| members.contains(principal))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// The members of a group (none if it is not defined).
    pub(crate) fn members(&self, group: &str) -> &[PrincipalLink] {
        self.groups.get(group).map_or(&[], Vec::as_slice)
    }

    /// How many service accounts, users and groups are defined; logged on each load.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.service_accounts.len(),
            self.users.len(),
            self.groups.len(),
        )
    }
}

fn parse_keys(raw: Vec<RawKey>, owner: &PrincipalLink) -> Result<Vec<Key>, PrincipalsError> {
    raw.into_iter()
        .enumerate()
        .map(|(index, key)| {
            let hash = KeyHash::parse(&key.hash).map_err(|source| PrincipalsError::Key {
                owner: owner.clone(),
                index,
                source,
            })?;
            Ok(Key {
                name: key.name,
                hash,
            })
        })
        .collect()
}

fn dummy_hash() -> KeyHash {
    KeyHash {
        salt: [0; SALT_LEN],
        hash: [0; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CI_KEY: &str = "ci-key-0123456789abcdef";
    const ALICE_KEY: &str = "alice-key-0123456789abcdef";

    fn file() -> Principals {
        let doc = json!({
            "serviceAccounts": [
                {"name": "ci", "keys": [{"name": "k1", "hash": KeyHash::generate(CI_KEY).to_string()}]},
                {"name": "deploy", "description": "no keys yet"},
            ],
            "users": [
                {"email": "Alice@Example.com", "keys": [
                    {"name": "laptop", "hash": KeyHash::generate("old-key-0123456789abcdef").to_string()},
                    {"name": "desktop", "hash": KeyHash::generate(ALICE_KEY).to_string()},
                ]},
            ],
            "groups": [
                {"name": "devs", "memberLinks": ["//user/alice@example.com", "//serviceaccount/ci"]},
                {"name": "ops", "memberLinks": ["/org/my-org/serviceaccount/deploy"]},
            ],
        });
        Principals::parse(doc.to_string().as_bytes(), Some("my-org")).unwrap()
    }

    #[test]
    fn service_accounts_log_in_as_token_and_users_by_email() {
        let principals = file();
        let ci = principals.verify("<token>", CI_KEY.as_bytes()).unwrap();
        assert_eq!(ci.principal.to_string(), "//serviceaccount/ci");
        assert_eq!(ci.key_name.as_deref(), Some("k1"));
        let alice = principals
            .verify("ALICE@example.com", ALICE_KEY.as_bytes())
            .unwrap();
        assert_eq!(alice.principal.to_string(), "//user/alice@example.com");
        assert_eq!(alice.key_name.as_deref(), Some("desktop"));
    }

    #[test]
    fn wrong_keys_and_unknown_users_are_refused() {
        let principals = file();
        assert_eq!(principals.verify("<token>", b"nope"), None);
        assert_eq!(principals.verify("<token>", ALICE_KEY.as_bytes()), None);
        assert_eq!(
            principals.verify("alice@example.com", CI_KEY.as_bytes()),
            None
        );
        assert_eq!(
            principals.verify("bob@example.com", ALICE_KEY.as_bytes()),
            None
        );
        assert_eq!(principals.verify("ci", CI_KEY.as_bytes()), None);
    }

    #[test]
    fn groups_list_their_members() {
        let principals = file();
        let alice = PrincipalLink::User("alice@example.com".into());
        let deploy = PrincipalLink::ServiceAccount("deploy".into());
        assert_eq!(principals.groups_of(&alice), ["devs"]);
        assert_eq!(principals.groups_of(&deploy), ["ops"]);
        assert_eq!(principals.members("devs").len(), 2);
        assert!(principals.members("nobody").is_empty());
    }

    #[test]
    fn key_hashes_round_trip_and_salt_differs() {
        let a = KeyHash::generate(CI_KEY);
        let b = KeyHash::generate(CI_KEY);
        assert_ne!(a.to_string(), b.to_string(), "each hash has its own salt");
        let parsed = KeyHash::parse(&a.to_string()).unwrap();
        assert!(parsed.verify(CI_KEY.as_bytes()));
        assert!(!parsed.verify(b"ci-key-0123456789abcdeF"));
        assert_eq!(format!("{a:?}"), "KeyHash(<redacted>)");
    }

    #[test]
    fn a_key_shared_by_two_accounts_identifies_no_one() {
        let hash = KeyHash::generate(CI_KEY).to_string();
        let doc = json!({"serviceAccounts": [
            {"name": "a", "keys": [{"hash": hash}]},
            {"name": "b", "keys": [{"hash": KeyHash::generate(CI_KEY).to_string()}]},
        ]});
        let principals = Principals::parse(doc.to_string().as_bytes(), None).unwrap();
        assert_eq!(principals.verify("<token>", CI_KEY.as_bytes()), None);
    }

    #[test]
    fn mistakes_in_the_file_are_errors_without_secrets() {
        let secret_hash = KeyHash::generate(CI_KEY).to_string();
        let cases = [
            (
                json!({"serviceAccounts": [{"name": "a", "keys": [{"hash": "plain"}]}]}),
                "key 0",
            ),
            (
                json!({"serviceAccounts": [{"name": "a"}, {"name": "a"}]}),
                "defined twice",
            ),
            (json!({"users": [{"email": "bob"}]}), "email"),
            (
                json!({"groups": [{"name": "g", "memberLinks": ["//user/x@y.z"]}]}),
                "not defined",
            ),
            (
                json!({"groups": [{"name": "g", "memberLinks": []}, {"name": "h", "memberLinks": ["//group/g"]}]}),
                "members are users and service accounts",
            ),
            (json!({"robots": []}), "robots"),
            (
                json!({"serviceAccounts": [{"name": "a", "keys": [{"hash": secret_hash, "key": "x"}]}]}),
                "key",
            ),
        ];
        for (doc, expected) in cases {
            let err = Principals::parse(doc.to_string().as_bytes(), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{doc}: {err}");
            assert!(!err.contains(&secret_hash[10..]), "{err}");
        }
    }
}
