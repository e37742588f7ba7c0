//! OCI value types and parsers: digests, names and references, API paths, byte ranges, the
//! media type inside a manifest.
//! Pure parsing only; nothing here does I/O.

pub mod digest;
pub mod manifest;
pub mod name;
pub mod range;
