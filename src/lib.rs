//! reflinkfs: VM disk volumes as image files in a pool directory, with
//! reflink snapshots on start and commits on stop.
//!
//! Layers, each using only those below it:
//! - [`cli`]: parses the command line and renders results, as text or
//!   JSON;
//! - [`daemon`]: a mounted pool's process: detaching, signals, its log,
//!   and the wiring of the mount and the control socket;
//! - [`fuse`]: the mount (kernel requests to filesystem operations) and
//!   [`control`]: the administration protocol, served on the pool's
//!   socket and run in-process when the pool is not mounted;
//! - [`engine`]: pools, volumes, lifecycle, revisions, recovery, adopt;
//! - [`sys`]: the safe wrappers around raw syscalls, the only place with
//!   `unsafe` FFI calls; and [`error`], the error type every layer shares.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fuse;
pub mod sys;

pub use error::{Error, ErrorClass, Result};
