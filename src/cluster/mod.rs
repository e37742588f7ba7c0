//! The replicas of one location acting as one cache: who owns which blob (`ring`), who is in
//! the location (`members`), the shared peer token (`token`), and peer requests (`peer`).
//!
//! Deliberately not here: fetching, verifying and storing (that is `fill`, which takes the owner
//! as the first source of a fill), and building responses (`api`).

pub mod ring;
pub mod token;
