//! OCI value types and parsers: digests, names and references, API paths, byte ranges.
//! Pure parsing only; nothing here does I/O.

pub mod digest;
pub mod name;
pub mod range;
