//! Outbound HTTP, shared by everything that dials out (upstreams, secret exchanges, `berth
//! warm`, `berth load`, the health probe): the pooled client with its TLS roots and timeouts
//! (`client`), the connector that applies the address rule after DNS (`connect`), and the rule
//! itself (`address`).
//!
//! A leaf: it reads `config::ClientConfig` and nothing else of the crate. What a registry
//! means by a status, a challenge or a redirect is `upstream`'s; which credentials to present
//! is `secrets`'.

pub mod address;
pub mod client;
pub mod connect;

pub use client::{error_chain, ClientError, HttpClient, SendError};
