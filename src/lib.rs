//! reflinkfs: VM disk volumes as image files in a pool directory, with
//! reflink snapshots on start and commits on stop.
//!
//! Layers:
//! - [`engine`]: pools, volumes, lifecycle, revisions, recovery;
//! - [`cli`]: the command-line front end;
//! - [`sys`]: the safe wrappers around raw syscalls.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fuse;
pub mod sys;

pub use error::{Error, ErrorClass, Result};
