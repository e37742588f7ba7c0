//! The errors of policy parsing: what is wrong in a policy file, and in one of its policies or
//! principal links. Kept apart from `policy` so that file stays about what policies mean.

use super::query::QueryError;
use crate::oci::name::NameError;

/// Why a policy file does not load: the file's JSON, or one policy in it (named).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {file}: {source}")]
    Json {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("policy {file}: a list without items")]
    NoItems { file: String },
    #[error("policy {file}: {policy:?}: {source}")]
    Rule {
        file: String,
        policy: String,
        #[source]
        source: RuleError,
    },
}

/// What is wrong in one policy (its target or a binding) or in one principal link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The message names the offending value.
    #[error("{0}")]
    Invalid(String),
    /// A target link's repository or tag; `link` is the whole link as written.
    #[error("{link:?}: {source}")]
    Name {
        link: String,
        #[source]
        source: NameError,
    },
    #[error(transparent)]
    Query(#[from] QueryError),
}
