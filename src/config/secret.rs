//! `[[secret]]`: pull secrets by name, type and file, and the checks of their entries. Reading
//! the files and using them is `secrets`' job.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// One `[[secret]]` entry of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// What upstreams (`secret = "NAME"`), logs and errors call it.
    pub name: String,
    /// The file's format: `docker`, `ecr` or `gcp`.
    #[serde(rename = "type")]
    pub kind: SecretKind,
    /// The secret file, re-read when it changes.
    pub file: PathBuf,
    /// STS endpoint for `ecr` secrets with a role; default `https://sts.REGION.amazonaws.com`
    /// (`{region}` in the value is replaced by the registry's region). For VPC endpoints and
    /// tests.
    #[serde(default)]
    pub sts_endpoint: Option<String>,
    /// ECR API endpoint for `ecr` secrets; default `https://api.ecr.REGION.amazonaws.com`
    /// (`{region}` is replaced likewise).
    #[serde(default)]
    pub ecr_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SecretKind {
    Docker,
    Ecr,
    Gcp,
}

/// Checks `[[secret]]` entries before use: names non-empty and unique, endpoint overrides
/// absolute URLs. The error names `secret[INDEX].FIELD`. Files are not read here: a bad file is a runtime condition that
/// fixing the file cures, not a reason to refuse to start.
pub(super) fn check_configs(configs: &[SecretConfig]) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, config) in configs.iter().enumerate() {
        let key = |field: &str| format!("secret[{i}].{field}");
        if config.name.trim().is_empty() {
            return Err(invalid(key("name"), "must not be empty"));
        }
        if !seen.insert(config.name.as_str()) {
            return Err(invalid(
                key("name"),
                format!("`{}` is used twice", config.name),
            ));
        }
        if config.file.as_os_str().is_empty() {
            return Err(invalid(key("file"), "must not be empty"));
        }
        for (field, url) in [
            ("sts_endpoint", &config.sts_endpoint),
            ("ecr_endpoint", &config.ecr_endpoint),
        ] {
            let Some(url) = url else { continue };
            if config.kind != SecretKind::Ecr {
                return Err(invalid(key(field), "applies to `type = \"ecr\"` only"));
            }
            let probe = url.replace("{region}", "us-east-1");
            let valid = probe.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !valid {
                return Err(invalid(
                    key(field),
                    format!("{url:?} is not an http(s) URL"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked_for_names_and_endpoints() {
        let config = |name: &str, kind, sts: Option<&str>| SecretConfig {
            name: name.into(),
            kind,
            file: "/dev/null".into(),
            sts_endpoint: sts.map(str::to_string),
            ecr_endpoint: None,
        };
        assert!(check_configs(&[config(
            "a",
            SecretKind::Ecr,
            Some("http://127.0.0.1:1/{region}")
        )])
        .is_ok());
        let cases = [
            (vec![config("", SecretKind::Docker, None)], "secret[0].name"),
            (
                vec![
                    config("a", SecretKind::Docker, None),
                    config("a", SecretKind::Gcp, None),
                ],
                "secret[1].name",
            ),
            (
                vec![config("a", SecretKind::Ecr, Some("sts.amazonaws.com"))],
                "secret[0].sts_endpoint",
            ),
            (
                vec![config(
                    "a",
                    SecretKind::Docker,
                    Some("https://sts.amazonaws.com"),
                )],
                "secret[0].sts_endpoint",
            ),
        ];
        for (configs, key) in cases {
            assert_eq!(check_configs(&configs).unwrap_err().key(), Some(key));
        }
    }

    #[test]
    fn config_entries_deserialize_from_toml() {
        #[derive(Deserialize)]
        struct Doc {
            secret: Vec<SecretConfig>,
        }
        let doc: Doc = toml::from_str(
            r#"
            [[secret]]
            name = "aws"
            type = "ecr"
            file = "/var/run/secrets/aws.json"
            ecr_endpoint = "https://ecr.internal"
            "#,
        )
        .unwrap();
        assert_eq!(doc.secret[0].kind, SecretKind::Ecr);
        assert!(toml::from_str::<Doc>("[[secret]]\nname='a'\ntype='azure'\nfile='f'").is_err());
        assert!(
            toml::from_str::<Doc>("[[secret]]\nname='a'\ntype='gcp'\nfile='f'\nextra=1").is_err()
        );
    }
}
