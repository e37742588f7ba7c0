//! OCI value types and parsers: digests, names and references, full image references, API
//! paths, byte ranges, the manifest model (media type, descriptors, platforms), the Accept
//! class of a manifest request. Pure parsing only; nothing here does I/O, and nothing here
//! imports the rest of the crate.

pub mod accept;
pub mod digest;
pub mod manifest;
pub mod name;
pub mod range;
pub mod reference;
