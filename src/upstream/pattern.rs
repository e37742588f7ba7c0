//! Host patterns: `*.azurecr.io`, `*-docker.pkg.dev`, `*.dkr.ecr.*.amazonaws.com`, so one
//! `[[upstream]]` entry covers a family of registries.
//!
//! A `*` stands for one or more characters within one DNS label: it never spans a '.', so
//! `*.azurecr.io` matches `myreg.azurecr.io` but not `a.b.azurecr.io` or `azurecr.io`.
//! Matching is case-insensitive. Pure; which upstream a match creates is `Upstreams`' business.

/// Whether `host` (possibly with `:port`) matches `pattern`.
pub fn matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    let pattern_labels: Vec<&str> = pattern.split('.').collect();
    let host_labels: Vec<&str> = host.split('.').collect();
    pattern_labels.len() == host_labels.len()
        && pattern_labels
            .iter()
            .zip(&host_labels)
            .all(|(p, h)| label_matches(p.as_bytes(), h.as_bytes()))
}

/// Glob match of one label, `*` matching one or more bytes.
fn label_matches(pattern: &[u8], label: &[u8]) -> bool {
    match pattern.split_first() {
        None => label.is_empty(),
        Some((b'*', rest)) => (1..=label.len()).any(|taken| label_matches(rest, &label[taken..])),
        Some((c, rest)) => label.first() == Some(c) && label_matches(rest, &label[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn families_match_their_members_only() {
        let cases = [
            ("*.azurecr.io", "myreg.azurecr.io", true),
            ("*.azurecr.io", "a.b.azurecr.io", false),
            ("*.azurecr.io", "azurecr.io", false),
            ("*-docker.pkg.dev", "us-central1-docker.pkg.dev", true),
            ("*-docker.pkg.dev", "-docker.pkg.dev", false),
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
            ("*.example:5000", "r.example:5000", true),
            ("*.example:5000", "r.example:5001", false),
        ];
        for (pattern, host, expected) in cases {
            assert_eq!(matches(pattern, host), expected, "{pattern} vs {host}");
        }
    }

    proptest! {
        #[test]
        fn a_star_never_spans_a_dot(label in "[a-z0-9]{1,10}", extra in "[a-z0-9]{1,10}") {
            let host = format!("{label}.azurecr.io");
            prop_assert!(matches("*.azurecr.io", &host));
            let deeper = format!("{extra}.{host}");
            prop_assert!(!matches("*.azurecr.io", &deeper));
        }
    }
}
