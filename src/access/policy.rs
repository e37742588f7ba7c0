//! Image policies in the platform's JSON form, and what they grant: parsing and evaluation over
//! plain data. No files, no requests, no clocks.
//!
//! A policy has a target (`target: "all"`, `targetLinks` naming tagged images, or a
//! `targetQuery` over the properties `repository`, `name` and `tag`) and bindings of permissions
//! to principal links. Permissions imply others as the platform documents for images: `manage`
//! implies all of them, `create` implies `pull`, `pull` and `edit` imply `view`.
//!
//! Evaluation asks about one image (repository and tag) or about a whole repository (tag
//! unknown). A registry pull is a repository question, because a pull token reaches every tag
//! and digest in the repository: a target grants it only if it covers the repository whatever
//! the tag is. So `target: "all"` and queries on `repository` grant pulls; `targetLinks` (always
//! one tag) and queries that depend on `tag` or `name` do not (the query language and its
//! three-valued logic are in `query`).
//!
//! Who belongs to which group, and whose key is whose, is `principals`' business; callers pass
//! the groups of the principal they ask about.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

pub use super::policy_error::{PolicyError, RuleError};
pub use super::query::Query;
use super::query::{parse_query, RawQuery};
pub use super::query::{ImageFacts, Term};
use crate::oci::name::{Repository, Tag};

/// The permissions of the platform's `image` kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Create,
    Delete,
    Edit,
    Manage,
    Pull,
    View,
}

impl Permission {
    pub const ALL: [Permission; 6] = [
        Permission::Create,
        Permission::Delete,
        Permission::Edit,
        Permission::Manage,
        Permission::Pull,
        Permission::View,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Create => "create",
            Permission::Delete => "delete",
            Permission::Edit => "edit",
            Permission::Manage => "manage",
            Permission::Pull => "pull",
            Permission::View => "view",
        }
    }

    pub fn parse(text: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// What the platform documents each image permission to imply directly.
    fn implies_directly(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Manage => &[Create, Delete, Edit, Pull, View],
            Create => &[Pull],
            Pull | Edit => &[View],
            Delete | View => &[],
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    pub fn insert(&mut self, permission: Permission) {
        self.0 |= permission.bit();
    }

    pub(crate) fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    /// The permissions and everything they imply, transitively.
    pub fn closure(self) -> Permissions {
        let mut all = self;
        loop {
            let before = all;
            for permission in all.iter() {
                for implied in permission.implies_directly() {
                    all.insert(*implied);
                }
            }
            if all == before {
                return all;
            }
        }
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |p| self.contains(*p))
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        let mut set = Permissions::default();
        for permission in iter {
            set.insert(permission);
        }
        set
    }
}

/// A principal as the platform links to it. Users are keyed by their email, lowercased (emails
/// are compared case-insensitively, as people type them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PrincipalLink {
    User(String),
    ServiceAccount(String),
    Group(String),
    /// Workload identities exist on the platform but never authenticate to berth; bindings to
    /// them are kept so reports show them.
    Identity(String),
}

impl PrincipalLink {
    /// Parses `//user/EMAIL`, `//serviceaccount/NAME`, `//group/NAME`, `//identity/NAME`, or the
    /// full `/org/ORG/...` form of our own org.
    pub fn parse(text: &str, org: Option<&str>) -> Result<PrincipalLink, RuleError> {
        let rest = relative_link(text, org)?;
        let (kind, name) = rest
            .split_once('/')
            .ok_or_else(|| RuleError::Invalid(format!("{text:?} is not a principal link")))?;
        if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
            return Err(RuleError::Invalid(format!(
                "{text:?} has no valid principal name"
            )));
        }
        match kind {
            "user" if name.contains('@') => Ok(PrincipalLink::User(name.to_lowercase())),
            "user" => Err(RuleError::Invalid(format!(
                "{text:?}: a user is named by an email"
            ))),
            "serviceaccount" => Ok(PrincipalLink::ServiceAccount(name.to_string())),
            "group" => Ok(PrincipalLink::Group(name.to_string())),
            "identity" => Ok(PrincipalLink::Identity(name.to_string())),
            _ => Err(RuleError::Invalid(format!(
                "{text:?}: principals are users, service accounts, groups and identities"
            ))),
        }
    }
}

impl fmt::Display for PrincipalLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrincipalLink::User(email) => write!(f, "//user/{email}"),
            PrincipalLink::ServiceAccount(name) => write!(f, "//serviceaccount/{name}"),
            PrincipalLink::Group(name) => write!(f, "//group/{name}"),
            PrincipalLink::Identity(name) => write!(f, "//identity/{name}"),
        }
    }
}

/// `//KIND/NAME` from `//KIND/NAME` or `/org/OUR_ORG/KIND/NAME`.
fn relative_link<'t>(text: &'t str, org: Option<&str>) -> Result<&'t str, RuleError> {
    if let Some(rest) = text.strip_prefix("//") {
        return Ok(rest);
    }
    let Some(rest) = text.strip_prefix("/org/") else {
        return Err(RuleError::Invalid(format!(
            "{text:?} is not a link (//KIND/NAME)"
        )));
    };
    let (link_org, rest) = rest
        .split_once('/')
        .ok_or_else(|| RuleError::Invalid(format!("{text:?} is not a link")))?;
    match org {
        Some(org) if org == link_org => Ok(rest),
        Some(org) => Err(RuleError::Invalid(format!(
            "{text:?} belongs to another org than {org:?}"
        ))),
        None => Err(RuleError::Invalid(format!(
            "{text:?}: full /org/ links need platform.org in the config"
        ))),
    }
}

/// One tagged image of our org's registry, as `targetLinks` name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLink {
    pub repository: String,
    pub tag: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    All,
    /// Links and a query; a policy may have either or both, and covers their union.
    Some {
        links: Vec<ImageLink>,
        query: Option<Query>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub permissions: Permissions,
    pub principals: Vec<PrincipalLink>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The policy's `name`, or the file it came from; reports cite it.
    pub name: String,
    pub target: Target,
    pub bindings: Vec<Binding>,
}

/// How a target covered an image; the access report says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    All,
    Link,
    Query,
}

impl Coverage {
    pub fn as_str(self) -> &'static str {
        match self {
            Coverage::All => "all",
            Coverage::Link => "link",
            Coverage::Query => "query",
        }
    }
}

impl Policy {
    /// Whether the target definitely covers the image (or, with no tag, every image of the
    /// repository), and how.
    pub fn covers(&self, image: &ImageFacts) -> Option<Coverage> {
        let (links, query) = match &self.target {
            Target::All => return Some(Coverage::All),
            Target::Some { links, query } => (links, query),
        };
        if let Some(tag) = image.tag {
            if links
                .iter()
                .any(|link| link.repository == image.repository && link.tag == tag)
            {
                return Some(Coverage::Link);
            }
        }
        match query {
            Some(query) if query.matches(image) => Some(Coverage::Query),
            _ => None,
        }
    }
}

/// What `principal` (a user or service account, member of `groups`) may do with the image.
pub fn permissions(
    policies: &[Policy],
    principal: &PrincipalLink,
    groups: &[&str],
    image: &ImageFacts,
) -> Permissions {
    let mut granted = Permissions::default();
    for policy in policies {
        if policy.covers(image).is_none() {
            continue;
        }
        for binding in &policy.bindings {
            if binding
                .principals
                .iter()
                .any(|link| binds(link, principal, groups))
            {
                granted = granted.union(binding.permissions);
            }
        }
    }
    granted.closure()
}

/// Whether a binding's link names the principal, directly or through one of its groups.
pub fn binds(link: &PrincipalLink, principal: &PrincipalLink, groups: &[&str]) -> bool {
    match link {
        PrincipalLink::Group(group) => groups.contains(&group.as_str()),
        other => other == principal,
    }
}

/// The platform's policy object; fields berth does not use (`id`, `tags`, `links`, ...) are
/// allowed so a policy exported from the platform loads as it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPolicy {
    name: Option<String>,
    target_kind: Option<String>,
    target: Option<String>,
    target_links: Option<Vec<String>>,
    target_query: Option<RawQuery>,
    #[serde(default)]
    bindings: Vec<RawBinding>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBinding {
    permissions: Vec<String>,
    principal_links: Vec<String>,
}

/// Parses one policy file: a policy object, a JSON array of them, or the platform's list form
/// (`{"kind": "list", "items": [...]}`). Policies of other target kinds are skipped, so an
/// export of every policy of an org can be dropped in as it is.
pub fn parse_file(
    bytes: &[u8],
    source_name: &str,
    org: Option<&str>,
) -> Result<Vec<Policy>, PolicyError> {
    let json = |source| PolicyError::Json {
        file: source_name.to_string(),
        source,
    };
    let doc: Value = serde_json::from_slice(bytes).map_err(json)?;
    let items = match doc {
        Value::Array(items) => items,
        Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("list") => {
            match map.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => {
                    return Err(PolicyError::NoItems {
                        file: source_name.to_string(),
                    })
                }
            }
        }
        other => vec![other],
    };
    let mut policies = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let mut raw: RawPolicy = serde_json::from_value(item).map_err(json)?;
        let name = raw.name.take().unwrap_or_else(|| match i {
            0 => source_name.to_string(),
            _ => format!("{source_name}[{i}]"),
        });
        let rule = |source| PolicyError::Rule {
            file: source_name.to_string(),
            policy: name.clone(),
            source,
        };
        if let Some(policy) = convert(raw, name.clone(), org).map_err(rule)? {
            policies.push(policy);
        }
    }
    Ok(policies)
}

/// One policy, named `name`; `None` for policies of other target kinds.
fn convert(raw: RawPolicy, name: String, org: Option<&str>) -> Result<Option<Policy>, RuleError> {
    match raw.target_kind.as_deref() {
        Some("image") => {}
        Some(_) => return Ok(None),
        None => {
            return Err(RuleError::Invalid(
                "targetKind is missing (berth reads \"image\" policies)".into(),
            ))
        }
    }
    let target = match raw.target.as_deref() {
        Some("all") => Target::All,
        Some(other) => {
            return Err(RuleError::Invalid(format!(
                "target {other:?}: the only value is \"all\""
            )))
        }
        None => {
            let links = raw
                .target_links
                .unwrap_or_default()
                .iter()
                .map(|link| parse_image_link(link, org))
                .collect::<Result<Vec<_>, _>>()?;
            let query = raw.target_query.map(parse_query).transpose()?;
            if links.is_empty() && query.is_none() {
                return Err(RuleError::Invalid(
                    "no target: set target \"all\", targetLinks or targetQuery".into(),
                ));
            }
            Target::Some { links, query }
        }
    };
    let bindings = raw
        .bindings
        .into_iter()
        .map(|binding| parse_binding(binding, org))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Policy {
        name,
        target,
        bindings,
    }))
}

/// `//image/NAME:TAG` or `/org/OUR_ORG/image/NAME:TAG`.
fn parse_image_link(text: &str, org: Option<&str>) -> Result<ImageLink, RuleError> {
    let rest = relative_link(text, org)?;
    let image = rest.strip_prefix("image/").ok_or_else(|| {
        RuleError::Invalid(format!(
            "target link {text:?} is not an image link (//image/NAME:TAG)"
        ))
    })?;
    let Some((repository, tag)) = image.rsplit_once(':').filter(|(_, t)| !t.contains('/')) else {
        return Err(RuleError::Invalid(format!(
            "target link {text:?} names no tag; a link is one tagged image, and a whole \
             repository is targeted with a query on `repository`"
        )));
    };
    let name = |source| RuleError::Name {
        link: text.to_string(),
        source,
    };
    let repository = Repository::parse(repository).map_err(name)?;
    let tag = Tag::parse(tag).map_err(name)?;
    Ok(ImageLink {
        repository: repository.as_str().to_string(),
        tag: tag.as_str().to_string(),
    })
}

fn parse_binding(raw: RawBinding, org: Option<&str>) -> Result<Binding, RuleError> {
    let permissions = raw
        .permissions
        .iter()
        .map(|text| {
            Permission::parse(text).ok_or_else(|| {
                RuleError::Invalid(format!(
                    "{text:?} is not an image permission (create, delete, edit, manage, pull, view)"
                ))
            })
        })
        .collect::<Result<Permissions, _>>()?;
    let principals = raw
        .principal_links
        .iter()
        .map(|link| PrincipalLink::parse(link, org))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Binding {
        permissions,
        principals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(value: Value) -> Policy {
        let mut parsed = parse_file(value.to_string().as_bytes(), "p", Some("my-org")).unwrap();
        assert_eq!(parsed.len(), 1);
        parsed.remove(0)
    }

    fn query_policy(match_: &str, terms: Value) -> Policy {
        policy(json!({
            "targetKind": "image",
            "targetQuery": {"kind": "image", "spec": {"match": match_, "terms": terms}},
            "bindings": [{"permissions": ["pull"], "principalLinks": ["//user/a@x.io"]}],
        }))
    }

    fn image<'a>(repository: &'a str, tag: Option<&'a str>) -> ImageFacts<'a> {
        ImageFacts { repository, tag }
    }

    fn term(op: &str, property: &str, value: Option<&str>) -> Value {
        match value {
            Some(value) => json!({"op": op, "property": property, "value": value}),
            None => json!({"op": op, "property": property}),
        }
    }

    #[test]
    fn every_op_over_every_property() {
        // (term, image tag, expected coverage): the repository is always "team/app".
        let cases = [
            (term("=", "repository", Some("team/app")), Some("v1"), true),
            (
                term("=", "repository", Some("team/other")),
                Some("v1"),
                false,
            ),
            (
                term("!=", "repository", Some("team/other")),
                Some("v1"),
                true,
            ),
            (
                term("!=", "repository", Some("team/app")),
                Some("v1"),
                false,
            ),
            (term("=", "tag", Some("v1")), Some("v1"), true),
            (term("=", "tag", Some("v1")), Some("v2"), false),
            (term("!=", "tag", Some("v1")), Some("v2"), true),
            (term("=", "name", Some("team/app:v1")), Some("v1"), true),
            (term("=", "name", Some("team/app:v1")), Some("v2"), false),
            (term(">", "tag", Some("1.9")), Some("1.10"), true),
            (term(">", "tag", Some("1.10")), Some("1.10"), false),
            (term(">=", "tag", Some("1.10")), Some("1.10"), true),
            (term(">=", "tag", Some("1.10")), Some("1.9"), false),
            (term("<", "tag", Some("1.10")), Some("1.9"), true),
            (term("<", "tag", Some("1.9")), Some("1.9"), false),
            (term("<=", "tag", Some("1.9")), Some("1.9"), true),
            (term("<=", "tag", Some("1.9")), Some("2.0"), false),
            (term(">", "repository", Some("team/a")), Some("v1"), true),
            (term("exists", "tag", None), Some("v1"), true),
            (term("!exists", "tag", None), Some("v1"), false),
            (term("exists", "repository", None), None, true),
            (term("!exists", "repository", None), None, false),
        ];
        for (t, tag, expected) in cases {
            let p = query_policy("all", json!([t.clone()]));
            assert_eq!(
                p.covers(&image("team/app", tag)).is_some(),
                expected,
                "{t} on tag {tag:?}"
            );
        }
    }

    #[test]
    fn terms_on_the_tag_never_cover_a_whole_repository() {
        for t in [
            term("=", "tag", Some("v1")),
            term("!=", "tag", Some("v1")),
            term("exists", "tag", None),
            term("!exists", "tag", None),
            term(">", "name", Some("a")),
        ] {
            for match_ in ["all", "any", "none"] {
                let p = query_policy(match_, json!([t.clone()]));
                assert_eq!(p.covers(&image("team/app", None)), None, "{match_} {t}");
            }
        }
    }

    #[test]
    fn match_modes_combine_terms() {
        let repo = term("=", "repository", Some("team/app"));
        let other = term("=", "repository", Some("team/other"));
        let tag = term("=", "tag", Some("v1"));
        let cases = [
            // (match, terms, tag, covers)
            ("all", json!([repo, tag]), Some("v1"), true),
            ("all", json!([repo, tag]), Some("v2"), false),
            ("all", json!([repo, other]), Some("v1"), false),
            ("all", json!([repo, tag]), None, false),
            ("all", json!([other, tag]), None, false),
            ("all", json!([]), None, true),
            ("any", json!([other, tag]), Some("v1"), true),
            ("any", json!([other, tag]), Some("v2"), false),
            ("any", json!([repo, tag]), None, true),
            ("any", json!([other, tag]), None, false),
            ("any", json!([]), Some("v1"), false),
            ("none", json!([other]), Some("v1"), true),
            ("none", json!([repo]), Some("v1"), false),
            ("none", json!([other, tag]), Some("v2"), true),
            ("none", json!([other, tag]), None, false),
            ("none", json!([]), None, true),
        ];
        for (match_, terms, tag, expected) in cases {
            let p = query_policy(match_, terms.clone());
            assert_eq!(
                p.covers(&image("team/app", tag)).is_some(),
                expected,
                "{match_} {terms} tag {tag:?}"
            );
        }
    }

    #[test]
    fn the_three_target_forms() {
        let all = policy(json!({"targetKind": "image", "target": "all", "bindings": []}));
        assert_eq!(all.covers(&image("x", None)), Some(Coverage::All));
        assert_eq!(
            all.covers(&image("docker.io/library/nginx", Some("1"))),
            Some(Coverage::All)
        );

        let links = policy(json!({
            "targetKind": "image",
            "targetLinks": ["//image/team/app:v1", "/org/my-org/image/tools:2"],
        }));
        assert_eq!(
            links.covers(&image("team/app", Some("v1"))),
            Some(Coverage::Link)
        );
        assert_eq!(
            links.covers(&image("tools", Some("2"))),
            Some(Coverage::Link)
        );
        assert_eq!(links.covers(&image("team/app", Some("v2"))), None);
        // A link is one tag: it never covers the whole repository a registry pull needs.
        assert_eq!(links.covers(&image("team/app", None)), None);

        let query = query_policy("all", json!([term("=", "repository", Some("team/app"))]));
        assert_eq!(
            query.covers(&image("team/app", None)),
            Some(Coverage::Query)
        );
        assert_eq!(query.covers(&image("team/app2", None)), None);
    }

    #[test]
    fn implications_follow_the_platform() {
        let closure = |p: Permission| -> Vec<&str> {
            [p].into_iter()
                .collect::<Permissions>()
                .closure()
                .iter()
                .map(Permission::as_str)
                .collect()
        };
        assert_eq!(
            closure(Permission::Manage),
            ["create", "delete", "edit", "manage", "pull", "view"]
        );
        assert_eq!(closure(Permission::Create), ["create", "pull", "view"]);
        assert_eq!(closure(Permission::Pull), ["pull", "view"]);
        assert_eq!(closure(Permission::Edit), ["edit", "view"]);
        assert_eq!(closure(Permission::View), ["view"]);
        assert_eq!(closure(Permission::Delete), ["delete"]);
    }

    #[test]
    fn bindings_apply_directly_and_through_groups() {
        let p = policy(json!({
            "targetKind": "image",
            "target": "all",
            "bindings": [
                {"permissions": ["view"], "principalLinks": ["//user/Alice@X.io"]},
                {"permissions": ["create"], "principalLinks": ["//group/builders"]},
                {"permissions": ["edit"], "principalLinks": ["/org/my-org/serviceaccount/ci"]},
            ],
        }));
        let policies = [p];
        let nginx = image("docker.io/library/nginx", None);
        let alice = PrincipalLink::User("alice@x.io".into());
        let ci = PrincipalLink::ServiceAccount("ci".into());
        let names = |set: Permissions| set.iter().map(Permission::as_str).collect::<Vec<_>>();
        assert_eq!(names(permissions(&policies, &alice, &[], &nginx)), ["view"]);
        assert_eq!(
            names(permissions(&policies, &alice, &["builders"], &nginx)),
            ["create", "pull", "view"]
        );
        assert_eq!(
            names(permissions(&policies, &ci, &[], &nginx)),
            ["edit", "view"]
        );
        let nobody = PrincipalLink::ServiceAccount("nobody".into());
        assert!(names(permissions(&policies, &nobody, &["others"], &nginx)).is_empty());
    }

    #[test]
    fn policies_grant_only_where_they_target() {
        let policies = [
            query_policy("all", json!([term("=", "repository", Some("team/app"))])),
            policy(json!({
                "targetKind": "image",
                "targetLinks": ["//image/secret:v1"],
                "bindings": [{"permissions": ["manage"], "principalLinks": ["//user/a@x.io"]}],
            })),
        ];
        let a = PrincipalLink::User("a@x.io".into());
        let pull = |repo, tag| {
            permissions(&policies, &a, &[], &image(repo, tag)).contains(Permission::Pull)
        };
        assert!(pull("team/app", None));
        assert!(!pull("team/other", None));
        assert!(pull("secret", Some("v1")));
        assert!(!pull("secret", None), "a tag link grants no registry pull");
    }

    #[test]
    fn exports_and_lists_load_and_other_kinds_are_skipped() {
        let list = json!({"kind": "list", "items": [
            {"kind": "policy", "name": "a", "id": "x", "tags": {}, "targetKind": "image", "target": "all"},
            {"kind": "policy", "name": "w", "targetKind": "workload", "target": "all"},
        ]});
        let parsed = parse_file(list.to_string().as_bytes(), "f", None).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].name, "a");
        let unnamed = json!([{"targetKind": "image", "target": "all"}]);
        let parsed = parse_file(unnamed.to_string().as_bytes(), "file-name", None).unwrap();
        assert_eq!(parsed[0].name, "file-name");
    }

    #[test]
    fn mistakes_are_errors_that_say_what_is_wrong() {
        let cases = [
            (json!({"target": "all"}), "targetKind"),
            (json!({"targetKind": "image"}), "no target"),
            (json!({"targetKind": "image", "target": "some"}), "\"all\""),
            (
                json!({"targetKind": "image", "targetLinks": ["//image/app"]}),
                "names no tag",
            ),
            (
                json!({"targetKind": "image", "targetLinks": ["//gvc/x"]}),
                "not an image link",
            ),
            (
                json!({"targetKind": "image", "targetLinks": ["/org/other/image/a:1"]}),
                "another org",
            ),
            (
                json!({"targetKind": "image", "targetQuery": {"spec": {"terms": [{"op": "~", "property": "tag", "value": "x"}]}}}),
                "op \"~\"",
            ),
            (
                json!({"targetKind": "image", "targetQuery": {"spec": {"terms": [{"property": "digest", "value": "x"}]}}}),
                "property \"digest\"",
            ),
            (
                json!({"targetKind": "image", "targetQuery": {"spec": {"terms": [{"op": "=", "property": "tag"}]}}}),
                "needs a value",
            ),
            (
                json!({"targetKind": "image", "targetQuery": {"spec": {"match": "most", "terms": []}}}),
                "match \"most\"",
            ),
            (
                json!({"targetKind": "image", "targetQuery": {"kind": "workload", "spec": {}}}),
                "kind \"workload\"",
            ),
            (
                json!({"targetKind": "image", "target": "all", "bindings": [{"permissions": ["push"], "principalLinks": []}]}),
                "\"push\" is not an image permission",
            ),
            (
                json!({"targetKind": "image", "target": "all", "bindings": [{"permissions": ["pull"], "principalLinks": ["//user/bob"]}]}),
                "email",
            ),
            (
                json!({"targetKind": "image", "target": "all", "bindings": [{"permissions": ["pull"], "principalLinks": ["//robot/r"]}]}),
                "principals are",
            ),
        ];
        for (doc, expected) in cases {
            let err = parse_file(doc.to_string().as_bytes(), "f", Some("my-org"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{doc}: {err}");
        }
    }

    #[test]
    fn numbers_and_booleans_are_values_too() {
        let p = query_policy("all", json!([{"op": ">=", "property": "tag", "value": 2}]));
        assert!(p.covers(&image("a", Some("10"))).is_some());
        assert!(p.covers(&image("a", Some("1"))).is_none());
    }
}
