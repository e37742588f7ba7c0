//! The `targetQuery` language of image policies: terms over `repository`, `name` and `tag`
//! combined by `match` (all, any, none), parsed from the platform's JSON and evaluated in
//! three-valued logic. Pure.
//!
//! A question is about one image (tag known) or about every image of a repository (tag
//! unknown, as for a registry pull). A term on an unknown property is neither true nor false,
//! and only a definite match counts, so a query grants a whole repository only if it matches
//! whatever the tag is.

use std::cmp::Ordering;

use serde::Deserialize;
use serde_json::Value;

/// The image properties a query can ask about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    /// The repository: `my-app` in our org's registry, `docker.io/library/nginx` elsewhere.
    Repository,
    /// `repository:tag`, as the platform names images.
    Name,
    Tag,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Exists,
    NotExists,
}

impl Op {
    pub fn parse(text: &str) -> Option<Op> {
        Some(match text {
            "=" => Op::Eq,
            "!=" => Op::Ne,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            "<" => Op::Lt,
            "<=" => Op::Le,
            "exists" => Op::Exists,
            "!exists" => Op::NotExists,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Match {
    All,
    Any,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub op: Op,
    pub property: Property,
    /// Absent only for `exists` and `!exists`.
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub(crate) match_: Match,
    pub terms: Vec<Term>,
}

/// What a question is about: one image, or every image of a repository (`tag: None`).
#[derive(Debug, Clone, Copy)]
pub struct ImageFacts<'a> {
    pub repository: &'a str,
    pub tag: Option<&'a str>,
}

/// Three-valued truth: a query about a repository cannot know the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    Yes,
    No,
    Unknown,
}

impl Truth {
    fn of(value: bool) -> Truth {
        if value {
            Truth::Yes
        } else {
            Truth::No
        }
    }

    fn not(self) -> Truth {
        match self {
            Truth::Yes => Truth::No,
            Truth::No => Truth::Yes,
            Truth::Unknown => Truth::Unknown,
        }
    }
}

impl Query {
    /// Whether the query definitely matches: for every possible tag, when the tag is unknown.
    pub fn matches(&self, image: &ImageFacts) -> bool {
        self.truth(image) == Truth::Yes
    }

    fn truth(&self, image: &ImageFacts) -> Truth {
        let truths = self.terms.iter().map(|term| term.truth(image));
        match self.match_ {
            Match::All => all(truths),
            Match::Any => any(truths),
            Match::None => any(truths).not(),
        }
    }
}

fn all(truths: impl Iterator<Item = Truth>) -> Truth {
    combine(truths, Truth::No, Truth::Yes)
}

fn any(truths: impl Iterator<Item = Truth>) -> Truth {
    combine(truths, Truth::Yes, Truth::No)
}

/// Three-valued `all` (`decisive` is No) or `any` (`decisive` is Yes): the first decisive truth
/// settles it; otherwise any Unknown makes the result Unknown, else it is `otherwise`.
fn combine(truths: impl Iterator<Item = Truth>, decisive: Truth, otherwise: Truth) -> Truth {
    let mut result = otherwise;
    for truth in truths {
        if truth == decisive {
            return decisive;
        }
        if truth == Truth::Unknown {
            result = Truth::Unknown;
        }
    }
    result
}

impl Term {
    fn truth(&self, image: &ImageFacts) -> Truth {
        let actual = match (self.property, image.tag) {
            (Property::Repository, _) => image.repository.to_string(),
            (Property::Tag, Some(tag)) => tag.to_string(),
            (Property::Name, Some(tag)) => format!("{}:{tag}", image.repository),
            (Property::Tag | Property::Name, None) => return Truth::Unknown,
        };
        // Every image has a repository, a name and (known here) a tag.
        let wanted = self.value.as_deref().unwrap_or_default();
        Truth::of(match self.op {
            Op::Exists => true,
            Op::NotExists => false,
            Op::Eq => actual == wanted,
            Op::Ne => actual != wanted,
            Op::Gt => natural_cmp(&actual, wanted) == Ordering::Greater,
            Op::Ge => natural_cmp(&actual, wanted) != Ordering::Less,
            Op::Lt => natural_cmp(&actual, wanted) == Ordering::Less,
            Op::Le => natural_cmp(&actual, wanted) != Ordering::Greater,
        })
    }
}

/// Orders values the way people read versions: runs of digits compare as numbers
/// (`1.9 < 1.10`), everything else as text, and a number sorts before text.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.is_empty(), b.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            (false, false) => {}
        }
        let (run_a, rest_a) = split_run(a);
        let (run_b, rest_b) = split_run(b);
        let digits_a = run_a.as_bytes()[0].is_ascii_digit();
        let digits_b = run_b.as_bytes()[0].is_ascii_digit();
        let order = match (digits_a, digits_b) {
            (true, true) => {
                let (ta, tb) = (run_a.trim_start_matches('0'), run_b.trim_start_matches('0'));
                ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
            }
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => run_a.cmp(run_b),
        };
        if order != Ordering::Equal {
            return order;
        }
        (a, b) = (rest_a, rest_b);
    }
}

/// The leading run of digits or of non-digits, and the rest. `text` is not empty.
fn split_run(text: &str) -> (&str, &str) {
    let digits = text.as_bytes()[0].is_ascii_digit();
    let end = text
        .find(|c: char| c.is_ascii_digit() != digits)
        .unwrap_or(text.len());
    text.split_at(end)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuery {
    kind: Option<String>,
    spec: Option<RawSpec>,
    #[serde(default)]
    #[allow(dead_code)]
    fetch: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    context: Option<Value>,
}

#[derive(Deserialize)]
struct RawSpec {
    #[serde(rename = "match")]
    match_: Option<String>,
    #[serde(default)]
    terms: Vec<RawTerm>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTerm {
    op: Option<String>,
    property: Option<String>,
    rel: Option<String>,
    tag: Option<String>,
    value: Option<Value>,
}

/// Why a `targetQuery` does not parse; the text names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("targetQuery kind {0:?} is not \"image\"")]
    Kind(String),
    #[error("targetQuery has no spec")]
    NoSpec,
    #[error("match {0:?} is not all, any or none")]
    Match(String),
    #[error("query terms on `rel` or `tag` (resource tags) are not supported; use `property`")]
    ResourceTags,
    #[error("op {0:?} is not one of = != > >= < <= exists !exists")]
    Op(String),
    #[error("property {0:?} is not repository, name or tag")]
    Property(String),
    #[error("a query term has no property")]
    NoProperty,
    /// The JSON value as written.
    #[error("value {0} is not a string or number")]
    Value(String),
    #[error("op {0:?} needs a value")]
    NoValue(String),
}

pub(super) fn parse_query(raw: RawQuery) -> Result<Query, QueryError> {
    if let Some(kind) = raw.kind.filter(|k| k != "image") {
        return Err(QueryError::Kind(kind));
    }
    let spec = raw.spec.ok_or(QueryError::NoSpec)?;
    let match_ = match spec.match_.as_deref().unwrap_or("all") {
        "all" => Match::All,
        "any" => Match::Any,
        "none" => Match::None,
        other => return Err(QueryError::Match(other.to_string())),
    };
    let terms = spec
        .terms
        .into_iter()
        .map(parse_term)
        .collect::<Result<_, _>>()?;
    Ok(Query { match_, terms })
}

fn parse_term(raw: RawTerm) -> Result<Term, QueryError> {
    if raw.rel.is_some() || raw.tag.is_some() {
        return Err(QueryError::ResourceTags);
    }
    let op_text = raw.op.as_deref().unwrap_or("=");
    let op = Op::parse(op_text).ok_or_else(|| QueryError::Op(op_text.to_string()))?;
    let property = match raw.property.as_deref() {
        Some("repository") => Property::Repository,
        Some("name") => Property::Name,
        Some("tag") => Property::Tag,
        Some(other) => return Err(QueryError::Property(other.to_string())),
        None => return Err(QueryError::NoProperty),
    };
    let value = match raw.value {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        Some(other) => return Err(QueryError::Value(other.to_string())),
    };
    if value.is_none() && !matches!(op, Op::Exists | Op::NotExists) {
        return Err(QueryError::NoValue(op_text.to_string()));
    }
    Ok(Term {
        op,
        property,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_reads_numbers_as_numbers() {
        use Ordering::*;
        for (a, b, order) in [
            ("1.9", "1.10", Less),
            ("1.10", "1.10", Equal),
            ("v2", "v10", Less),
            ("1.0", "1.0.1", Less),
            ("007", "7", Equal),
            ("1", "latest", Less),
            ("alpha", "beta", Less),
            ("", "a", Less),
        ] {
            assert_eq!(natural_cmp(a, b), order, "{a} vs {b}");
            assert_eq!(natural_cmp(b, a), order.reverse(), "{b} vs {a}");
        }
    }
}
