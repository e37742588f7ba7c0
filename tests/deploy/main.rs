//! The deployment pieces in `deploy/`, each exercised by the real tool that consumes it: the
//! container image built by podman and pulled through with skopeo, the node configs used by
//! containerd, podman and dockerd, the Kubernetes manifests rendered by kustomize and checked
//! against the API schemas, the systemd unit verified by systemd-analyze, and the two
//! subcommands made for them (`berth health`, `berth check-config`).
//!
//! CI installs every tool (`.ci/run`, `scripts/test`). A test whose tool is missing says so on
//! stderr in capitals and returns, so a developer without podman can still run the rest.

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod image;
mod kubernetes;
mod nodes;
mod podman;
mod systemd;
mod tools;
