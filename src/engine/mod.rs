//! The pool and volume engine (SPEC §1–§5, §7, §8). No FUSE in here: the
//! mount calls [`Pool::start`] on the first open of a `-dirty.img` and
//! [`Pool::stop`] on its last release, and does I/O on the returned file.

pub mod admin;
pub mod adopt;
pub mod config;
pub mod failpoint;
pub mod fsops;
pub mod lifecycle;
pub mod pool;
pub mod report;
pub mod revision;
pub mod size;
pub mod vid;
pub mod view;

pub use admin::{CreateOptions, NewKind, Property, ResizeOutcome};
pub use config::{PoolConfig, VolumeConfig, VolumeKind};
pub use lifecycle::StopOutcome;
pub use pool::{InitOptions, Names, Pool};
pub use report::{PoolInfo, Problem, Usage, VolumeInfo, VolumeStateName};
pub use revision::{Revision, RevisionId};
pub use size::{format_size, parse_size};
pub use vid::ValidVid;
