//! Administration through the control socket and offline: online parity, incremental export and import, and `pool adopt`.
//!
//! One test binary of modules, so that `cargo test` links the crate
//! once for all of them (see `tests/common` for the scratch filesystems).
#![allow(clippy::unwrap_used)] // in tests, a failed unwrap fails the test

#[path = "../common/mod.rs"]
mod common;

mod adopt;
mod delta;
mod online;
