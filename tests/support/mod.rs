//! Shared support for berth's integration tests: everything a test needs around the proxy.
//!
//! Owns:
//! - berth itself: in process on port 0 (`berth`), as the real binary for tests that send
//!   signals (`process`), and the usual registry + tap + berth set-up (`stack`);
//! - upstreams: a real registry process (`registry`), its token server (`token`), an in-process
//!   tap that counts and breaks upstream traffic (`tap`, `fault`), a hostile registry
//!   (`hostile`), a server answering from a closure (`scripted`) with a test CA for TLS (`ca`),
//!   and stand-ins for the cloud services behind pull secrets (`cloud`);
//! - content and clients: synthetic images and the code that pushes them (`image`, `push`), a
//!   plain-HTTP test client (`client`), and real pulling clients (`skopeo`, `containerd`).
//!
//! Does not own: assertions about berth (those are the tests). It never touches the internet:
//! every server binds 127.0.0.1 port 0 and every tool gets private config. tests/deploy shares
//! it through `#[path]`.
//!
//! Picture of a typical test:
//! ```text
//!   test client / skopeo ──> berth ──> Tap (counts, injects faults) ──> Registry (docker-registry)
//!                                                                         ^ push_image(...)
//! ```
//!
//! Each integration test pulls this in with `mod support;` and uses only part of it, so the
//! unused-code lints below would fire in every test binary that skips a helper.
#![allow(dead_code, unused_imports)]

pub mod berth;
pub mod ca;
pub mod client;
pub mod cloud;
pub mod containerd;
pub mod fault;
pub mod hostile;
pub mod image;
pub mod process;
pub mod push;
pub mod registry;
pub mod scripted;
pub mod skopeo;
pub mod stack;
pub mod tap;
pub mod token;

pub use berth::{single_upstream_config, Berth};
pub use client::{
    error_code, fetch, get, read_body, request, send, send_get, strings_at, Creds, Fetched,
};
pub use containerd::{Containerd, CtrImage, HostsDir};
pub use fault::Fault;
pub use hostile::Hostile;
pub use image::{random_blob, random_layer, Blob, Flavor, Image, Index, Layer, Platform};
pub use process::BerthProcess;
pub use push::{push_blob, push_image, push_index, push_manifest, PushError};
pub use registry::{Auth, Registry};
pub use skopeo::{read_oci_layout, skopeo_copy, skopeo_copy_ok, OciLayout};
pub use stack::Stack;
pub use tap::{Kind, Seen, Tap};
pub use token::{push_image_bearer, Access, Challenge, Policy, TokenRequest, TokenServer};

/// The whole number in environment variable `name`, or `default` when it is unset or not a
/// number: how the long runs (soaks) are asked for.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
