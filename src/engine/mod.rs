//! The pool and volume engine (SPEC §1–§5, §7, §8). No FUSE in here: the
//! mount takes a [`Lease`] ([`Pool::acquire`]) for every open of a
//! `-dirty.img`, which starts the volume the first time, gives it back at
//! release ([`Pool::release`]), and runs the stop the last one asks for
//! ([`Pool::finish_stop`]) on its committer threads. Each volume is a state
//! machine (`volume.rs`) whose lock is never held across I/O.
//!
//! # Shape
//!
//! [`Pool`] is the one entry point, and its methods are grouped by service,
//! a file (or folder) each; the modules form no cycle (`tests/engine/layers.rs`
//! checks it). From the bottom up:
//! - the base: the volume table (`table.rs`: lookup, corrupt configs, ids
//!   being created, held runs), each volume's state and config writer
//!   (`volume.rs`), the pool's open, lock and one config update
//!   (`pool.rs`), and the leaves (`config`, `names`, `revision`, `ident`,
//!   `fsops`, `vid`, `size`, `failpoint`);
//! - lifecycle: start, stop, commit, recovery and the precache
//!   (`lifecycle`, `phase`, `commit`, `stopping`, `recovery`, `precache`,
//!   `source`);
//! - administration (`admin`, `resize`, `props`, `pins`, `attach`);
//! - transfers (`transfer`, `delta/`);
//! - reports and the mount's views (`report`, `check`, `listing`, `view`,
//!   `dirs`), and `adopt/`.
//!
//! A service reaches a lower one through `Pool`'s methods and the few
//! helpers the lower one exports (`lifecycle::open_image`, `io_ctx`, …);
//! never the other way.

pub mod admin;
pub mod adopt;
pub mod attach;
mod check;
mod commit;
pub mod config;
pub mod delta;
mod dirs;
pub mod failpoint;
pub mod fsops;
pub mod guard;
mod ident;
pub mod lifecycle;
pub mod listing;
pub mod names;
mod phase;
pub mod pins;
pub mod pool;
pub mod precache;
pub mod props;
mod recovery;
pub mod report;
mod resize;
pub mod revision;
mod setup_check;
pub mod size;
mod source;
mod stopping;
mod table;
pub mod transfer;
pub mod vid;
pub mod view;
pub mod volume;

pub use admin::{CreateOptions, NewKind, ResizeOutcome};
pub use config::{AttachedLoop, Pending, Pin, PoolConfig, VolumeConfig, VolumeKind};
pub use lifecycle::StopOutcome;
pub use pins::RevertOutcome;
pub use pool::{InitOptions, Names, Pool};
pub use props::{PoolProperty, Property};
pub use report::{PoolInfo, Problem, Usage, VolumeInfo, VolumeStateName};
pub use revision::{Revision, RevisionId};
pub use size::{format_size, parse_size};
pub use vid::ValidVid;
pub use volume::{Attachment, Lease, LifeState, OpName, PendingStop, Snapshot};
