//! The principals file and the policies directory, loaded together as one snapshot and loaded
//! again when any of them changes.
//!
//! A change is noticed by comparing each file's modification time, length and inode (and the
//! set of `*.json` files in the directory) when access is checked, at most once per
//! `reload_interval`; Kubernetes' atomic swap of a mounted ConfigMap or Secret gives new inodes,
//! so it is seen even when times and lengths match. No watcher thread, no timer: a periodic
//! task would also drive tokio's paused clock forward in tests.
//!
//! A snapshot that fails to load (a typo in a policy) does not replace the one in force: the
//! error is logged once and the previous snapshot keeps answering until the files are fixed. At
//! start-up there is no previous snapshot, so a bad file stops berth with the error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stamp::Stamp;

use super::policy::{self, Policy, PolicyError};
use super::principals::{Principals, PrincipalsError};

/// Bigger files are a wrong path, not a principals file or a policy.
const MAX_FILE: u64 = 4 << 20;

/// Why the principals file or the policies directory does not load; the text names the file.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("policies directory {}: {source}", dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: larger than {MAX_FILE} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("principals file {}: {source}", path.display())]
    Principals {
        path: PathBuf,
        #[source]
        source: PrincipalsError,
    },
    #[error("{}: {source}", path.display())]
    Policy {
        path: PathBuf,
        #[source]
        source: Box<PolicyError>,
    },
}

/// The `FilesError::Read` of `path`, for `map_err`.
fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |source| FilesError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// The principals and policies in force.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub principals: Principals,
    pub policies: Vec<Policy>,
    /// Counts loads; caches of verified keys are only good for the generation they saw.
    pub(crate) generation: u64,
}

pub(crate) struct Files {
    principals: PathBuf,
    policies: PathBuf,
    org: Option<String>,
    recheck: Duration,
    state: Mutex<State>,
}

struct State {
    checked: Instant,
    stamps: Vec<(PathBuf, Stamp)>,
    snapshot: Arc<Snapshot>,
    /// The last load error, so it is logged once rather than at every check.
    failed: Option<String>,
}

impl Files {
    /// Loads both now; an error names the file and what is wrong with it.
    pub fn open(
        principals: &Path,
        policies: &Path,
        org: Option<&str>,
        recheck: Duration,
    ) -> Result<Files, FilesError> {
        let stamps = stamps(principals, policies)?;
        let snapshot = load(principals, policies, org, 1)?;
        log_loaded(&snapshot);
        Ok(Files {
            principals: principals.to_path_buf(),
            policies: policies.to_path_buf(),
            org: org.map(str::to_string),
            recheck,
            state: Mutex::new(State {
                checked: Instant::now(),
                stamps,
                snapshot: Arc::new(snapshot),
                failed: None,
            }),
        })
    }

    /// The snapshot in force, after loading the files again if they changed.
    pub fn current(&self) -> Arc<Snapshot> {
        let mut state = self.state.lock().expect("access files lock");
        if state.checked.elapsed() < self.recheck {
            return Arc::clone(&state.snapshot);
        }
        state.checked = Instant::now();
        let stamps = match stamps(&self.principals, &self.policies) {
            Ok(stamps) => stamps,
            Err(err) => {
                report_failure(&mut state, err);
                return Arc::clone(&state.snapshot);
            }
        };
        if stamps == state.stamps {
            return Arc::clone(&state.snapshot);
        }
        let generation = state.snapshot.generation + 1;
        match load(
            &self.principals,
            &self.policies,
            self.org.as_deref(),
            generation,
        ) {
            Ok(snapshot) => {
                log_loaded(&snapshot);
                state.stamps = stamps;
                state.snapshot = Arc::new(snapshot);
                state.failed = None;
            }
            // The stamps stay old, so the next check tries again.
            Err(err) => report_failure(&mut state, err),
        }
        Arc::clone(&state.snapshot)
    }
}

fn report_failure(state: &mut State, err: FilesError) {
    let err = err.to_string();
    if state.failed.as_ref() != Some(&err) {
        tracing::error!(error = %err, "access files not reloaded; the previous principals and policies stay in force");
        state.failed = Some(err);
    }
}

fn log_loaded(snapshot: &Snapshot) {
    let (service_accounts, users, groups) = snapshot.principals.counts();
    tracing::info!(
        generation = snapshot.generation,
        service_accounts,
        users,
        groups,
        policies = snapshot.policies.len(),
        "access principals and policies loaded"
    );
}

/// The policy files: `*.json` in the directory, not hidden (Kubernetes keeps its `..data`
/// machinery in dot-entries), in name order.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, FilesError> {
    let directory = |source| FilesError::Directory {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(directory)? {
        let entry = entry.map_err(directory)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".json") {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

fn stamps(principals: &Path, policies: &Path) -> Result<Vec<(PathBuf, Stamp)>, FilesError> {
    std::iter::once(principals.to_path_buf())
        .chain(policy_files(policies)?)
        .map(|path| {
            let stamp = Stamp::of(&path).map_err(read_error(&path))?;
            Ok((path, stamp))
        })
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, FilesError> {
    let len = std::fs::metadata(path).map_err(read_error(path))?.len();
    if len > MAX_FILE {
        return Err(FilesError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    std::fs::read(path).map_err(read_error(path))
}

fn load(
    principals_path: &Path,
    policies_dir: &Path,
    org: Option<&str>,
    generation: u64,
) -> Result<Snapshot, FilesError> {
    let principals = Principals::parse(&read(principals_path)?, org).map_err(|source| {
        FilesError::Principals {
            path: principals_path.to_path_buf(),
            source,
        }
    })?;
    let mut policies = Vec::new();
    for path in policy_files(policies_dir)? {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parsed =
            policy::parse_file(&read(&path)?, &name, org).map_err(|source| FilesError::Policy {
                path: path.clone(),
                source: Box::new(source),
            })?;
        policies.extend(parsed);
    }
    Ok(Snapshot {
        principals,
        policies,
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(path: &Path, value: serde_json::Value) {
        // Write then rename, as Kubernetes swaps mounted files: a new inode every time.
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, value.to_string()).unwrap();
        std::fs::rename(&temp, path).unwrap();
    }

    /// A temp dir holding the path of `principals.json` (not written) and an empty `policies/`.
    fn layout() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let principals = dir.path().join("principals.json");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        (dir, principals, policies)
    }

    fn all_for(user: &str) -> serde_json::Value {
        json!({"targetKind": "image", "target": "all",
               "bindings": [{"permissions": ["pull"], "principalLinks": [format!("//user/{user}")]}]})
    }

    #[test]
    fn changes_are_loaded_and_broken_files_keep_the_previous_snapshot() {
        let (_dir, principals, policies) = layout();
        write(&principals, json!({"users": [{"email": "a@x.io"}]}));
        write(&policies.join("a.json"), all_for("a@x.io"));
        std::fs::write(policies.join(".hidden.json"), "not json").unwrap();
        std::fs::write(policies.join("notes.txt"), "not a policy").unwrap();
        let files = Files::open(&principals, &policies, None, Duration::ZERO).unwrap();
        let first = files.current();
        assert_eq!((first.generation, first.policies.len()), (1, 1));
        assert_eq!(first.policies[0].name, "a");
        assert!(Arc::ptr_eq(&first, &files.current()), "nothing changed");

        write(&policies.join("b.json"), all_for("b@x.io"));
        let second = files.current();
        assert_eq!((second.generation, second.policies.len()), (2, 2));

        std::fs::write(policies.join("c.json"), "{ broken").unwrap();
        let kept = files.current();
        assert!(Arc::ptr_eq(&second, &kept), "a broken file changes nothing");

        std::fs::remove_file(policies.join("c.json")).unwrap();
        write(
            &principals,
            json!({"users": [{"email": "a@x.io"}, {"email": "b@x.io"}]}),
        );
        let third = files.current();
        assert_eq!(third.generation, 3);
        assert_eq!(third.principals.counts(), (0, 2, 0));
    }

    #[test]
    fn the_documented_example_loads_and_grants_what_it_says() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/access");
        let files = Files::open(
            &deploy.join("principals.json"),
            &deploy.join("policies"),
            Some("my-org"),
            Duration::ZERO,
        )
        .unwrap();
        let snapshot = files.current();
        assert_eq!(snapshot.principals.counts(), (2, 1, 2));
        let pull = |who: &str, repository: &str| {
            let link = policy::PrincipalLink::parse(who, None).unwrap();
            let groups = snapshot.principals.groups_of(&link);
            let facts = policy::ImageFacts {
                repository,
                tag: None,
            };
            policy::permissions(&snapshot.policies, &link, &groups, &facts)
                .contains(policy::Permission::Pull)
        };
        assert!(pull("//serviceaccount/ci", "team/api"));
        assert!(pull("//user/alice@example.com", "docker.io/library/nginx"));
        assert!(!pull("//user/alice@example.com", "team/secret"));
        assert!(pull("//serviceaccount/cluster-prod", "team/secret"));
    }

    #[test]
    fn a_bad_file_at_start_is_an_error_naming_it() {
        let (dir, principals, policies) = layout();
        write(&principals, json!({}));
        std::fs::write(policies.join("p.json"), r#"{"targetKind":"image"}"#).unwrap();
        let err = Files::open(&principals, &policies, None, Duration::ZERO)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("p.json") && err.contains("no target"), "{err}");
        let missing = Files::open(
            &dir.path().join("nope.json"),
            &policies,
            None,
            Duration::ZERO,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(missing.contains("nope.json"), "{missing}");
    }
}
