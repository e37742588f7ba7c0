//! The access report: who holds which permission on one image, which policy grants it, whether
//! directly or through a group, and which permissions are only implied by others. Pure: it
//! reads policies and principals already loaded.
//!
//! Each principal also gets `registryPull`: whether a registry client authenticating as it may
//! pull the image's repository through berth (which needs a grant covering every tag, see
//! `policy`), as opposed to holding `pull` on this one tagged image.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::policy::{permissions, ImageFacts, Permission, Permissions, Policy, PrincipalLink};
use super::principals::Principals;
use super::{full_name, Access, AccessError};
use crate::route;
use crate::upstream::Upstreams;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The image as asked about, fully resolved (`docker.io/library/nginx:latest`).
    pub image: String,
    /// The repository policies see (`my-app` in our org's registry, `docker.io/...` elsewhere).
    pub repository: String,
    pub tag: Option<String>,
    /// The upstream is `public = true`: every authenticated principal may pull from it.
    pub public: bool,
    pub principals: Vec<PrincipalReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrincipalReport {
    pub principal: String,
    pub registry_pull: bool,
    pub permissions: Vec<GrantLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantLine {
    pub permission: &'static str,
    /// The policy whose binding grants it.
    pub policy: String,
    /// How the policy's target covers the image: `all`, `link` or `query`.
    pub target: &'static str,
    /// The group whose binding reaches this principal, if not bound directly.
    pub via: Option<String>,
    /// The permission this one is implied by, when it was not granted by name.
    pub implied_by: Option<&'static str>,
}

/// Builds the report for one image (`facts.tag` set) or a whole repository (`tag: None`).
pub fn report(
    image: &str,
    facts: &ImageFacts,
    public: bool,
    policies: &[Policy],
    principals: &Principals,
) -> Report {
    let mut lines: BTreeMap<PrincipalLink, Vec<GrantLine>> = BTreeMap::new();
    for policy in policies {
        let Some(coverage) = policy.covers(facts) else {
            continue;
        };
        for binding in &policy.bindings {
            for link in &binding.principals {
                let mut reached = vec![(link.clone(), None)];
                if let PrincipalLink::Group(group) = link {
                    reached.extend(
                        principals
                            .members(group)
                            .iter()
                            .map(|member| (member.clone(), Some(link.to_string()))),
                    );
                }
                for (principal, via) in reached {
                    let entry = lines.entry(principal).or_default();
                    for granted in binding.permissions.iter() {
                        let implied = [granted].into_iter().collect::<Permissions>().closure();
                        for permission in implied.iter() {
                            entry.push(GrantLine {
                                permission: permission.as_str(),
                                policy: policy.name.clone(),
                                target: coverage.as_str(),
                                via: via.clone(),
                                implied_by: (permission != granted).then_some(granted.as_str()),
                            });
                        }
                    }
                }
            }
        }
    }
    let repository_facts = ImageFacts {
        repository: facts.repository,
        tag: None,
    };
    let principals_report = lines
        .into_iter()
        .map(|(principal, mut permissions)| {
            permissions.sort_by_key(|line| {
                (
                    Permission::parse(line.permission),
                    line.implied_by.is_some(),
                    line.clone(),
                )
            });
            permissions.dedup();
            PrincipalReport {
                registry_pull: may_pull(
                    &principal,
                    &repository_facts,
                    public,
                    policies,
                    principals,
                ),
                principal: principal.to_string(),
                permissions,
            }
        })
        .collect();
    Report {
        image: image.to_string(),
        repository: facts.repository.to_string(),
        tag: facts.tag.map(str::to_string),
        public,
        principals: principals_report,
    }
}

fn may_pull(
    principal: &PrincipalLink,
    repository: &ImageFacts,
    public: bool,
    policies: &[Policy],
    principals: &Principals,
) -> bool {
    match principal {
        // Members of the group may pull through it.
        PrincipalLink::Group(group) => {
            permissions(policies, principal, &[group.as_str()], repository)
                .contains(Permission::Pull)
        }
        // Workload identities never authenticate to berth.
        PrincipalLink::Identity(_) => false,
        _ => {
            principals.contains(principal)
                && (public
                    || permissions(
                        policies,
                        principal,
                        &principals.groups_of(principal),
                        repository,
                    )
                    .contains(Permission::Pull))
        }
    }
}

impl Report {
    /// The report as text for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "image:      {}", self.image);
        let _ = writeln!(out, "repository: {} (as policies see it)", self.repository);
        if self.public {
            let _ = writeln!(
                out,
                "public:     every authenticated principal may pull from this upstream"
            );
        }
        if self.principals.is_empty() {
            let _ = writeln!(out, "\nno principal holds a permission on this image");
        }
        for principal in &self.principals {
            let pull = if principal.registry_pull { "yes" } else { "no" };
            let _ = writeln!(out, "\n{}  (registry pull: {pull})", principal.principal);
            for line in &principal.permissions {
                let _ = write!(
                    out,
                    "  {:<7} policy {:?} (target {})",
                    line.permission, line.policy, line.target
                );
                if let Some(via) = &line.via {
                    let _ = write!(out, " via {via}");
                }
                if let Some(by) = line.implied_by {
                    let _ = write!(out, ", implied by {by}");
                }
                out.push('\n');
            }
        }
        out
    }
}

impl Access {
    /// The access report of an image in any reference form (`nginx:1`, `//image/app:v1`).
    pub fn report(&self, upstreams: &Upstreams, image: &str) -> Result<Report, AccessError> {
        let files = self.files.as_ref().ok_or_else(|| {
            AccessError::Report("the access report needs [access] principals and policies".into())
        })?;
        let (target, parsed) = route::resolve_image_ref(upstreams, image)
            .map_err(|e| AccessError::Report(e.to_string()))?;
        let reference = &parsed.reference;
        let snapshot = files.current();
        let repository = self.policy_repository(&target);
        let tag = match reference {
            crate::oci::name::Reference::Tag(tag) => Some(tag.as_str()),
            crate::oci::name::Reference::Digest(_) => None,
        };
        // A pinned `NAME:TAG@DIGEST` is judged by its digest and shown with its tag.
        let separator = if tag.is_some() || parsed.pinned_tag.is_some() {
            ":"
        } else {
            "@"
        };
        let shown = format!(
            "{}{separator}{}",
            full_name(&target),
            parsed.shown_reference()
        );
        let facts = ImageFacts {
            repository: &repository,
            tag,
        };
        Ok(report(
            &shown,
            &facts,
            target.upstream.public,
            &snapshot.policies,
            &snapshot.principals,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::policy::parse_file;
    use crate::access::principals::KeyHash;
    use serde_json::json;

    fn fixtures() -> (Vec<Policy>, Principals) {
        let hash = KeyHash::generate("some-key-0123456789abc").to_string();
        let principals = Principals::parse(
            json!({
                "serviceAccounts": [{"name": "ci", "keys": [{"hash": hash}]}],
                "users": [{"email": "alice@x.io"}, {"email": "bob@x.io"}],
                "groups": [{"name": "devs", "memberLinks": ["//user/alice@x.io", "//serviceaccount/ci"]}],
            })
            .to_string()
            .as_bytes(),
            None,
        )
        .unwrap();
        let policies = json!([
            {"name": "devs-pull", "targetKind": "image",
             "targetQuery": {"spec": {"terms": [{"op": "=", "property": "repository", "value": "team/app"}]}},
             "bindings": [{"permissions": ["pull"], "principalLinks": ["//group/devs"]}]},
            {"name": "bob-v1", "targetKind": "image", "targetLinks": ["//image/team/app:v1"],
             "bindings": [{"permissions": ["manage"], "principalLinks": ["//user/bob@x.io"]}]},
            {"name": "elsewhere", "targetKind": "image",
             "targetQuery": {"spec": {"terms": [{"op": "=", "property": "repository", "value": "other"}]}},
             "bindings": [{"permissions": ["manage"], "principalLinks": ["//user/alice@x.io"]}]},
        ]);
        let policies = parse_file(policies.to_string().as_bytes(), "f", None).unwrap();
        (policies, principals)
    }

    #[test]
    fn lists_each_permission_with_its_policy_group_and_implication() {
        let (policies, principals) = fixtures();
        let facts = ImageFacts {
            repository: "team/app",
            tag: Some("v1"),
        };
        let report = report("r.io/team/app:v1", &facts, false, &policies, &principals);
        let who: Vec<(&str, bool)> = report
            .principals
            .iter()
            .map(|p| (p.principal.as_str(), p.registry_pull))
            .collect();
        assert_eq!(
            who,
            [
                ("//user/alice@x.io", true),
                ("//user/bob@x.io", false),
                ("//serviceaccount/ci", true),
                ("//group/devs", true),
            ]
        );
        let alice = &report.principals[0].permissions;
        assert_eq!(
            alice,
            &[
                GrantLine {
                    permission: "pull",
                    policy: "devs-pull".into(),
                    target: "query",
                    via: Some("//group/devs".into()),
                    implied_by: None,
                },
                GrantLine {
                    permission: "view",
                    policy: "devs-pull".into(),
                    target: "query",
                    via: Some("//group/devs".into()),
                    implied_by: Some("pull"),
                },
            ]
        );
        let bob: Vec<(&str, Option<&str>)> = report.principals[1]
            .permissions
            .iter()
            .map(|l| (l.permission, l.implied_by))
            .collect();
        assert_eq!(
            bob,
            [
                ("create", Some("manage")),
                ("delete", Some("manage")),
                ("edit", Some("manage")),
                ("manage", None),
                ("pull", Some("manage")),
                ("view", Some("manage")),
            ]
        );
        let text = report.to_text();
        assert!(
            text.contains("pull    policy \"devs-pull\" (target query) via //group/devs"),
            "{text}"
        );
        assert!(text.contains("implied by manage"), "{text}");
    }

    #[test]
    fn another_tag_loses_the_link_grant() {
        let (policies, principals) = fixtures();
        let facts = ImageFacts {
            repository: "team/app",
            tag: Some("v2"),
        };
        let report = report("team/app:v2", &facts, false, &policies, &principals);
        assert!(report
            .principals
            .iter()
            .all(|p| p.principal != "//user/bob@x.io"));
    }

    #[test]
    fn public_upstreams_let_every_known_principal_pull() {
        let (policies, principals) = fixtures();
        let facts = ImageFacts {
            repository: "docker.io/library/nginx",
            tag: Some("1"),
        };
        let report = report(
            "docker.io/library/nginx:1",
            &facts,
            true,
            &policies,
            &principals,
        );
        assert!(report.public);
        assert!(report.principals.is_empty(), "no policy targets it");
        assert!(report.to_text().contains("every authenticated principal"));
    }
}
