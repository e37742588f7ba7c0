//! Shared support for berth's integration tests: everything a test needs around the proxy.
//!
//! Owns: a real upstream registry process (`registry`), synthetic images and the code that pushes
//! them (`image`, `push`), a plain-HTTP test client (`client`), an in-process tap that counts and
//! breaks upstream traffic (`tap`, `fault`), and a real pulling client (`skopeo`).
//! Does not own: starting berth itself (that belongs next to the lead's server API), and it never
//! touches the internet: every server binds 127.0.0.1 port 0 and every tool gets private config.
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
pub use client::{fetch, get, read_body, request, send, Creds, Fetched};
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
