//! Host patterns: `*.azurecr.io`, `*-docker.pkg.dev`, `*.dkr.ecr.*.amazonaws.com`, so one
//! `[[upstream]]` entry covers a family of registries.
//!
//! A `*` stands for one or more `[a-z0-9-]` characters within one DNS label: it never spans a
//! '.' or a ':', so `*.azurecr.io` matches `myreg.azurecr.io` but not `a.b.azurecr.io`,
//! `azurecr.io` or `myreg.azurecr.io:8080`. A port in the pattern must be matched exactly.
//! `check` refuses patterns that cover too much (`*`, `*.*`, `*.com`): at least two whole
//! literal labels must follow the last `*`, so a pattern always stays inside one operator's
//! domain. Matching is over a validated `RegistryHost`, so it sees only lower-case
//! `[a-z0-9-.]` and a port. Pure; which upstream a match creates is `Upstreams`' business.

use super::host::RegistryHost;

/// Why a pattern is refused at start-up (the caller names the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{0:?} has a malformed port")]
    Port(String),
    #[error("{0:?}: each label is [a-z0-9-] with at most one `*`")]
    Label(String),
    #[error(
        "{0:?} covers too much: at least two literal labels must follow the last `*` \
         (as in `*.azurecr.io`)"
    )]
    TooBroad(String),
}

/// Refuses a pattern that is malformed or covers more than one operator's domain.
pub fn check(pattern: &str) -> Result<(), PatternError> {
    let lower = pattern.to_ascii_lowercase();
    let (name, port) = match lower.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (lower.as_str(), None),
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(PatternError::Port(pattern.to_string()));
    }
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        let chars_ok = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*');
        if label.is_empty() || !chars_ok || label.matches('*').count() > 1 {
            return Err(PatternError::Label(pattern.to_string()));
        }
    }
    let last_star = labels.iter().rposition(|l| l.contains('*'));
    let literal_after = last_star.map_or(labels.len(), |i| labels.len() - i - 1);
    if last_star.is_some() && literal_after < 2 {
        return Err(PatternError::TooBroad(pattern.to_string()));
    }
    Ok(())
}

/// Whether `host` matches `pattern` (a pattern `check` accepted).
pub fn matches(pattern: &str, host: &RegistryHost) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let (pattern_name, pattern_port) = match pattern.split_once(':') {
        Some((name, port)) => (name, port.parse::<u16>().ok()),
        None => (pattern.as_str(), None),
    };
    if pattern_port != host.port() {
        return false;
    }
    let pattern_labels: Vec<&str> = pattern_name.split('.').collect();
    let host_labels: Vec<&str> = host.name().split('.').collect();
    pattern_labels.len() == host_labels.len()
        && pattern_labels
            .iter()
            .zip(&host_labels)
            .all(|(p, h)| label_matches(p.as_bytes(), h.as_bytes()))
}

/// Glob match of one label, `*` matching one or more `[a-z0-9-]` bytes.
fn label_matches(pattern: &[u8], label: &[u8]) -> bool {
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    match pattern.split_first() {
        None => label.is_empty(),
        Some((b'*', rest)) => (1..=label.len())
            .take_while(|&taken| allowed(&label[taken - 1]))
            .any(|taken| label_matches(rest, &label[taken..])),
        Some((c, rest)) => label.first() == Some(c) && label_matches(rest, &label[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(text: &str) -> RegistryHost {
        RegistryHost::parse(text).unwrap()
    }

    #[test]
    fn families_match_their_members_only() {
        let cases = [
            ("*.azurecr.io", "myreg.azurecr.io", true),
            ("*.azurecr.io", "a.b.azurecr.io", false),
            ("*.azurecr.io", "azurecr.io", false),
            ("*.azurecr.io", "myreg.azurecr.io:8080", false),
            ("*-docker.pkg.dev", "us-central1-docker.pkg.dev", true),
            ("*-docker.pkg.dev", "docker.pkg.dev", false),
            (
                "*.dkr.ecr.*.amazonaws.com",
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                true,
            ),
            (
                "*.dkr.ecr.*.amazonaws.com",
                "123.dkr.ecr.amazonaws.com",
                false,
            ),
            ("*.gcr.io", "eu.gcr.io", true),
            ("*.gcr.io", "gcr.io", false),
            ("*.azurecr.io", "MyReg.AzureCR.io", true),
            ("public.ecr.aws", "public.ecr.aws", true),
            ("*.reg.example:5000", "r.reg.example:5000", true),
            ("*.reg.example:5000", "r.reg.example:5001", false),
            ("*.reg.example:5000", "r.reg.example", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(check(pattern), Ok(()), "{pattern}");
            assert_eq!(
                matches(pattern, &host(name)),
                expected,
                "{pattern} vs {name}"
            );
        }
    }

    #[test]
    fn patterns_that_cover_too_much_are_refused() {
        for pattern in [
            "*",
            "*.*",
            "*.com",
            "a.*.com",
            "*.dkr.*.com",
            "**.gcr.io",
            "*a*.gcr.io",
            "*.gcr.io:",
            "*.gcr.io:x",
            "*..gcr.io",
            "*.gcr/.io",
            "*.gcr.io/x",
        ] {
            assert!(check(pattern).is_err(), "{pattern}");
        }
        for pattern in ["docker.io", "localhost", "*.gcr.io", "*-docker.pkg.dev"] {
            assert_eq!(check(pattern), Ok(()), "{pattern}");
        }
    }

    proptest! {
        #[test]
        fn a_star_never_spans_a_dot(label in "[a-z0-9]{1,10}", extra in "[a-z0-9]{1,10}") {
            let name = format!("{label}.azurecr.io");
            prop_assert!(matches("*.azurecr.io", &host(&name)));
            let deeper = format!("{extra}.{name}");
            prop_assert!(!matches("*.azurecr.io", &host(&deeper)));
        }
    }
}
