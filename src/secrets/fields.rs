//! Reading a secret file's JSON field by field, with errors that name the secret and the field
//! and never echo a value.
//!
//! Secret files are parsed into `serde_json::Value` and walked by hand instead of derived serde
//! structs because serde's type errors quote the offending value (`invalid type: string
//! "hunter2"`), and a value in a secret file is a secret. This module knows JSON shapes only;
//! what each format means is in `docker`, `ecr` and `gcp`.

use serde_json::{Map, Value};

use super::SecretError;

/// A JSON object inside one secret file, with the path that led to it (for error messages).
pub(super) struct Fields<'a> {
    secret: &'a str,
    /// Empty at the root.
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// The whole document, which every format requires to be a JSON object.
    pub fn root(secret: &'a str, doc: &'a Value) -> Result<Fields<'a>, SecretError> {
        match doc {
            Value::Object(map) => Ok(Fields {
                secret,
                path: String::new(),
                map,
            }),
            _ => Err(SecretError::Field {
                name: secret.to_string(),
                field: "(document)".to_string(),
                problem: format!("must be a JSON object, not {}", kind(doc)),
            }),
        }
    }

    /// The error for `key` of this object; `problem` must never contain the value.
    pub fn error(&self, key: &str, problem: impl Into<String>) -> SecretError {
        self.error_at(self.path_of(key), problem)
    }

    /// The error for item `index` of the array `key`.
    pub(crate) fn item_error(
        &self,
        key: &str,
        index: usize,
        problem: impl Into<String>,
    ) -> SecretError {
        self.error_at(format!("{}[{index}]", self.path_of(key)), problem)
    }

    fn error_at(&self, field: String, problem: impl Into<String>) -> SecretError {
        SecretError::Field {
            name: self.secret.to_string(),
            field,
            problem: problem.into(),
        }
    }

    /// `key`'s path from the document root: `auths["docker.io"].auth`, `repos[2]`.
    pub(crate) fn path_of(&self, key: &str) -> String {
        let simple = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let step = if simple {
            key.to_string()
        } else {
            format!("[{key:?}]")
        };
        match (self.path.is_empty(), simple) {
            (true, _) => step,
            (false, true) => format!("{}.{step}", self.path),
            (false, false) => format!("{}{step}", self.path),
        }
    }

    /// A required, non-empty string.
    pub fn string(&self, key: &str) -> Result<&'a str, SecretError> {
        match self.optional_string(key)? {
            Some(value) => Ok(value),
            None => Err(self.error(key, "is missing")),
        }
    }

    /// A string that may be absent or null; present but empty counts as absent.
    pub(crate) fn optional_string(&self, key: &str) -> Result<Option<&'a str>, SecretError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(key, format!("must be a string, not {}", kind(other)))),
        }
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&'a str>, SecretError> {
        let items = match self.map.get(key) {
            None | Some(Value::Null) => return Err(self.error(key, "is missing")),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(self.error(
                    key,
                    format!("must be an array of strings, not {}", kind(other)),
                ))
            }
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.as_str()),
                other => {
                    Err(self.item_error(key, i, format!("must be a string, not {}", kind(other))))
                }
            })
            .collect()
    }

    /// A required object, as `Fields` whose errors carry the longer path.
    pub fn object(&self, key: &str) -> Result<Fields<'a>, SecretError> {
        match self.map.get(key) {
            Some(Value::Object(map)) => Ok(Fields {
                secret: self.secret,
                path: self.path_of(key),
                map,
            }),
            None | Some(Value::Null) => Err(self.error(key, "is missing")),
            Some(other) => Err(self.error(key, format!("must be an object, not {}", kind(other)))),
        }
    }

    /// The keys of this object, sorted (serde_json's map is ordered by key).
    pub fn keys(&self) -> impl Iterator<Item = &'a String> {
        self.map.keys()
    }
}

/// The JSON type of a value, for "must be a string, not a number": the type, never the value.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON syntax error as position and category only: serde_json's messages are safe today, but
/// the position is all an operator needs and cannot leak content whatever serde_json prints.
pub(super) fn syntax_reason(err: &serde_json::Error) -> String {
    let category = match err.classify() {
        serde_json::error::Category::Eof => "unexpected end of file",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "invalid data",
        serde_json::error::Category::Io => "read error",
    };
    format!("{category} at line {} column {}", err.line(), err.column())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_name_the_field_path_and_the_type_but_never_the_value() {
        let doc = json!({"user": 42, "auths": {"docker.io": {"auth": ["hunter2"]}}});
        let root = Fields::root("hub", &doc).unwrap();
        let err = root.string("user").unwrap_err().to_string();
        assert_eq!(
            err,
            "secret `hub`: field `user` must be a string, not a number"
        );
        let auths = root.object("auths").unwrap();
        let entry = auths.object("docker.io").unwrap();
        let err = entry.string("auth").unwrap_err().to_string();
        assert_eq!(
            err,
            "secret `hub`: field `auths[\"docker.io\"].auth` must be a string, not an array"
        );
        assert!(!err.contains("hunter2"));
    }

    #[test]
    fn missing_and_empty_strings_are_missing() {
        let doc = json!({"a": "", "b": null});
        let root = Fields::root("s", &doc).unwrap();
        for key in ["a", "b", "c"] {
            assert!(root
                .string(key)
                .unwrap_err()
                .to_string()
                .ends_with("is missing"));
        }
    }

    #[test]
    fn a_non_object_document_is_rejected() {
        let doc = json!(["secret"]);
        let err = Fields::root("s", &doc).err().unwrap().to_string();
        assert_eq!(
            err,
            "secret `s`: field `(document)` must be a JSON object, not an array"
        );
    }

    #[test]
    fn array_items_are_named_by_index() {
        let doc = json!({"repos": ["a", 7]});
        let err = Fields::root("e", &doc)
            .unwrap()
            .strings("repos")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "secret `e`: field `repos[1]` must be a string, not a number"
        );
    }

    #[test]
    fn syntax_errors_report_position_only() {
        let err = serde_json::from_str::<Value>("{\"password\": hunter2}").unwrap_err();
        let reason = syntax_reason(&err);
        assert!(
            reason.starts_with("syntax error at line 1 column"),
            "{reason}"
        );
        assert!(!reason.contains("hunter2"));
    }
}
