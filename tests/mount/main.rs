//! The mounted filesystem, for real: mounts, I/O clients, hostile users, liveness, power cuts, `volume attach`, a new user's first steps, and conformance with Qubes' file-reflink.
//!
//! One test binary of modules, so that `cargo test` links the crate
//! once for all of them (see `tests/common` for the scratch filesystems).
#![allow(clippy::unwrap_used)] // in tests, a failed unwrap fails the test

#[path = "../common/mod.rs"]
mod common;

mod adversarial;
mod attach;
mod conformance;
mod front_door;
mod io_clients;
mod liveness;
mod mount;
mod powercut;
