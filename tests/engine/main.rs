//! The engine as a library, without a mount: a reference model, names, crashes at every failpoint, ENOSPC, the precache, the scenarios of doc/SEMANTICS.md, the README's commands, and the source's own rules (layers).
//!
//! One test binary of modules, so that `cargo test` links the crate
//! once for all of them (see `tests/common` for the scratch filesystems).
#![allow(clippy::unwrap_used)] // in tests, a failed unwrap fails the test

#[path = "../common/mod.rs"]
mod common;

mod crash;
mod enospc;
mod layers;
mod model;
mod names;
mod precache;
mod readme;
mod scenarios;
