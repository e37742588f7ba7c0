//! OCI value types and parsers: digests, names and references, API paths, byte ranges, the
//! media type inside a manifest, the Accept class of a manifest request.
//! Pure parsing only; nothing here does I/O.

pub mod accept;
pub mod digest;
pub mod manifest;
pub mod name;
pub mod range;
