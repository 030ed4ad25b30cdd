//! One volume in memory: its config and its lifecycle, as one state
//! machine under one lock that is never held across I/O.
//!
//! # States
//!
//! ```text
//!            acquire                 start done
//!  Stopped ----------> Starting ---------------> Running{leases, run}
//!     ^                   | start failed             |  last lease returned,
//!     |<------------------+                          v  finish_stop
//!     |<------------------------------------ Committing
//!     |          commit or discard done             | the dirty image is still
//!     |                                             v  written outside reflinkfs
//!     |                                   Running{leases: 0, held}
//!  Removed (terminal: the volume is gone; every waiter fails cleanly)
//! ```
//!
//! Beside the phase, one administration operation may be in progress
//! ([`OpName`]): while it is, other operations and starts wait for it, or,
//! for the unbounded ones (an import from a pipe, a clone), are refused
//! with EBUSY at once, so that nothing ever waits on a client.
//!
//! # The lock order, in one place
//!
//! 1. `Pool::volumes` (the map of volumes), read or write, held only to
//!    look a volume up, insert or remove it;
//! 2. one volume's `life` mutex, held only to read or change its state (or
//!    around the one rename that replaces its committed image, so that a
//!    reader sees the image and its generation together);
//! 3. `Pool::held`, `Pool::creating` (sets of ids), leaves.
//!
//! Beside them, each volume has a config writer (`Volume::write_config`),
//! which serialises every change of its config: read, change, store (an
//! fsync), publish. It may be held across that I/O, and is taken before
//! the volume's `life` mutex, never while holding it (the new config is
//! published under `life`, briefly). It never waits for another volume.
//!
//! Never two volumes' locks at once: whoever needs another volume (a
//! snapshot's source) reads it after releasing its own. No lock of this
//! module is held across I/O that can take long: copies, fsync, commits,
//! reads from a client.

use super::config::VolumeConfig;
use super::fsops::FileSig;
use super::vid::ValidVid;
use crate::error::{Cause, Error, Result};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::any::Any;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An administration operation in progress on a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpName {
    Import,
    Clone,
    Resize,
    Revert,
    Set,
    Remove,
    RemoveRevision,
}

impl OpName {
    pub const ALL: [OpName; 7] = [
        OpName::Import,
        OpName::Clone,
        OpName::Resize,
        OpName::Revert,
        OpName::Set,
        OpName::Remove,
        OpName::RemoveRevision,
    ];

    /// How the operation shows as a state in `status`, `volume list`,
    /// `info` and the `state` xattr.
    pub fn as_str(self) -> &'static str {
        match self {
            OpName::Import => "importing",
            OpName::Clone => "cloning",
            OpName::Resize => "resizing",
            OpName::Revert => "reverting",
            OpName::Set => "setting",
            OpName::Remove => "removing",
            OpName::RemoveRevision => "removing a revision",
        }
    }

    /// Whether others wait for it. An import or a clone into the volume
    /// reads from a client or copies without bound, so a start or another
    /// operation is refused at once instead of waiting on it.
    fn waitable(self) -> bool {
        !matches!(self, OpName::Import | OpName::Clone)
    }
}

/// A volume's state at one instant: an operation in progress, else its
/// phase. `status` sends it as `busy[].state` (doc/CONTROL.md), under the
/// names of `as_str`; a name this build does not know (from a newer
/// daemon) reads as `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifeState {
    Stopped,
    Starting,
    Running,
    /// Closed, but its dirty image is still written outside reflinkfs.
    Held,
    Committing,
    /// Gone: every waiter fails.
    Removed,
    /// An operation is in progress.
    Busy(OpName),
    Unknown,
}

impl LifeState {
    /// Every state but `Unknown`.
    pub fn all() -> impl Iterator<Item = LifeState> {
        use LifeState::*;
        [Stopped, Starting, Running, Held, Committing, Removed]
            .into_iter()
            .chain(OpName::ALL.map(Busy))
    }

    /// Its name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            LifeState::Stopped => "stopped",
            LifeState::Starting => "starting",
            LifeState::Running => "running",
            LifeState::Held => "held",
            LifeState::Committing => "committing",
            LifeState::Removed => "removed",
            LifeState::Busy(op) => op.as_str(),
            LifeState::Unknown => "unknown",
        }
    }
}

crate::error::display_as_str!(LifeState);
crate::error::serde_as_str!(LifeState);

/// Something the user of a run attaches to it once, at its start (the
/// mount's passthrough registration and write lock), and that lives as
/// long as the run.
pub type Attachment = Arc<dyn Any + Send + Sync>;

/// Who is told when a volume's files or properties change (the mount, to
/// drop what the kernel caches of them). Called with no lock held, on the
/// thread that made the change, before the change shows in the volume's
/// state (so a waiter that sees the new state sees fresh attributes).
pub type ChangeHook = Box<dyn Fn(&ValidVid) + Send + Sync>;

/// The hooks of a pool, shared by its volumes.
#[derive(Default)]
pub struct Hooks(parking_lot::RwLock<Vec<ChangeHook>>);

impl Hooks {
    pub fn add(&self, hook: ChangeHook) {
        self.0.write().push(hook);
    }

    pub fn changed(&self, vid: &ValidVid) {
        for h in self.0.read().iter() {
            h(vid);
        }
    }
}

/// A started run of a volume.
pub(crate) struct Run {
    /// Open file handles (leases) on the run (none once it is held).
    pub leases: usize,
    /// Signature of the dirty image right after start, to tell whether it
    /// was modified. `None` for a dirty image found at recovery, which is
    /// always committed.
    pub started_sig: Option<FileSig>,
    /// For snapshot volumes: the origin and the generation of its committed
    /// image that this start copied.
    pub started_from: Option<(ValidVid, u64)>,
    /// The volume's size for this run: its contract with the clients.
    /// Writes the daemon sees may not go past it, and the stop cuts the
    /// image back to it (passthrough writes past the end reach the backing
    /// file without the daemon). Changed only by a resize.
    pub limit: Arc<AtomicU64>,
    pub state: RunState,
}

/// Whether a run still serves its clients.
pub(crate) enum RunState {
    /// Open to leases.
    Live {
        /// The dirty image, open read-write.
        file: Arc<File>,
        attachment: Option<Attachment>,
        /// The loop device `volume attach` put on the dirty image: it
        /// holds one of the leases, given back by `volume detach`.
        attached: Option<super::config::AttachedLoop>,
    },
    /// The run is over for reflinkfs, but not committed yet: the daemon
    /// retries its stop every second (see [`HeldBy`]).
    Held(HeldBy),
}

/// Why a held run is not committed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeldBy {
    /// A stop found the dirty image still open for writing outside
    /// reflinkfs, by these holders: it is committed once they let go.
    Writers(String),
    /// A stop panicked (a bug) with the dirty image still there: the
    /// retry commits it. `tries`: the stops that panicked in a row.
    InterruptedStop { tries: u32 },
}

impl HeldBy {
    /// What the status and the log say holds it.
    pub fn describe(&self) -> String {
        match self {
            HeldBy::Writers(holders) => holders.clone(),
            HeldBy::InterruptedStop { .. } => {
                "no one (its stop was interrupted by an internal error, and is retried)".into()
            }
        }
    }
}

impl Run {
    /// The phase of a run that is over for reflinkfs but not committed yet
    /// (see [`HeldBy`]).
    pub fn held_over(
        started_sig: Option<FileSig>,
        started_from: Option<(ValidVid, u64)>,
        limit: Arc<AtomicU64>,
        by: HeldBy,
    ) -> Phase {
        Phase::Running(Box::new(Run {
            leases: 0,
            started_sig,
            started_from,
            limit,
            state: RunState::Held(by),
        }))
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    /// Why a held run is not committed yet.
    pub fn held(&self) -> Option<&HeldBy> {
        match &self.state {
            RunState::Held(by) => Some(by),
            RunState::Live { .. } => None,
        }
    }

    /// The dirty image of a live run.
    pub fn file(&self) -> Option<&Arc<File>> {
        match &self.state {
            RunState::Live { file, .. } => Some(file),
            RunState::Held(_) => None,
        }
    }

    /// The loop device of `volume attach` on a live run.
    pub fn attached(&self) -> Option<super::config::AttachedLoop> {
        match &self.state {
            RunState::Live { attached, .. } => *attached,
            RunState::Held(_) => None,
        }
    }

    /// The record of the loop device, to change; `None` for a held run.
    pub fn attached_mut(&mut self) -> Option<&mut Option<super::config::AttachedLoop>> {
        match &mut self.state {
            RunState::Live { attached, .. } => Some(attached),
            RunState::Held(_) => None,
        }
    }
}

pub(crate) enum Phase {
    Stopped,
    Starting,
    Running(Box<Run>),
    Committing,
    Removed,
}

/// The state under a volume's lock.
pub(crate) struct Life {
    pub config: Arc<VolumeConfig>,
    pub phase: Phase,
    pub op: Option<OpName>,
}

impl Life {
    pub fn run(&self) -> Option<&Run> {
        match &self.phase {
            Phase::Running(r) => Some(r),
            _ => None,
        }
    }

    pub fn run_mut(&mut self) -> Option<&mut Run> {
        match &mut self.phase {
            Phase::Running(r) => Some(r),
            _ => None,
        }
    }

    /// A name for the state, for status and list: an operation in
    /// progress, then the phase.
    pub fn state_name(&self) -> LifeState {
        if let Some(op) = self.op {
            return LifeState::Busy(op);
        }
        match &self.phase {
            Phase::Stopped => LifeState::Stopped,
            Phase::Starting => LifeState::Starting,
            Phase::Running(r) if r.held().is_some() => LifeState::Held,
            Phase::Running(_) => LifeState::Running,
            Phase::Committing => LifeState::Committing,
            Phase::Removed => LifeState::Removed,
        }
    }
}

/// What a reader sees of a volume at one instant, taken without waiting.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub config: Arc<VolumeConfig>,
    /// An operation in progress, else the phase.
    pub state: LifeState,
    /// Started and not yet committed (running, held, or committing).
    pub running: bool,
    pub held: Option<String>,
    pub leases: usize,
    pub started_from: Option<(ValidVid, u64)>,
    pub limit: Option<u64>,
    /// The loop device of `volume attach`, while attached.
    pub attached: Option<super::config::AttachedLoop>,
}

pub(crate) struct Volume {
    pub vid: ValidVid,
    life: Mutex<Life>,
    changed: Condvar,
    hooks: Arc<Hooks>,
    /// Held by whoever changes the config, from its read to its publication
    /// (see [`Volume::write_config`]).
    config_writer: Mutex<()>,
}

impl Volume {
    pub fn new(config: VolumeConfig, hooks: Arc<Hooks>) -> Arc<Volume> {
        Arc::new(Volume {
            vid: config.vid.clone(),
            life: Mutex::new(Life {
                config: Arc::new(config),
                phase: Phase::Stopped,
                op: None,
            }),
            changed: Condvar::new(),
            hooks,
            config_writer: Mutex::new(()),
        })
    }

    /// Starts a change of the config: until the writer drops, no other
    /// change of this volume's config can start, so what it reads is what
    /// it replaces (no change is lost between a read and a store). Taken
    /// before `life`, never while it is held; may be held across I/O.
    pub fn write_config(&self) -> ConfigWriter<'_> {
        ConfigWriter {
            volume: self,
            _one: self.config_writer.lock(),
        }
    }

    /// Tells the pool's hooks that this volume's files or properties
    /// changed. Never called with the lock held.
    pub fn changed(&self) {
        self.hooks.changed(&self.vid);
    }

    /// The state, locked (briefly: never across I/O).
    pub fn lock(&self) -> MutexGuard<'_, Life> {
        self.life.lock()
    }

    /// Wakes everyone waiting for a change of this volume.
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    pub fn wait(&self, life: &mut MutexGuard<'_, Life>) {
        self.changed.wait(life);
    }

    /// As [`Volume::wait`], but not past `deadline`; true when it timed out.
    pub fn wait_until(
        &self,
        life: &mut MutexGuard<'_, Life>,
        deadline: std::time::Instant,
    ) -> bool {
        self.changed.wait_until(life, deadline).timed_out()
    }

    pub fn config(&self) -> Arc<VolumeConfig> {
        self.lock().config.clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        let life = self.lock();
        let run = life.run();
        Snapshot {
            config: life.config.clone(),
            state: life.state_name(),
            running: run.is_some() || matches!(life.phase, Phase::Committing),
            held: run.and_then(|r| r.held().map(HeldBy::describe)),
            leases: run.map_or(0, |r| r.leases),
            started_from: run.and_then(|r| r.started_from.clone()),
            limit: run.map(Run::limit),
            attached: run.and_then(Run::attached),
        }
    }

    /// Waits until neither a start, a commit nor an operation is in
    /// progress, or fails when an unbounded operation is (or the volume was
    /// removed). Returns with the lock held.
    pub fn wait_settled(&self) -> Result<MutexGuard<'_, Life>> {
        let mut life = self.lock();
        loop {
            if matches!(life.phase, Phase::Removed) {
                return Err(Error::NoSuchVolume(self.vid.to_string()));
            }
            if let Some(op) = life.op {
                if !op.waitable() {
                    let cause = match op {
                        OpName::Import => Cause::Importing,
                        _ => Cause::InProgress,
                    };
                    return Err(Error::because(
                        &self.vid,
                        cause,
                        format!("it is {} (an operation in progress)", op.as_str()),
                    ));
                }
            }
            let transient = matches!(life.phase, Phase::Starting | Phase::Committing);
            if !transient && life.op.is_none() {
                return Ok(life);
            }
            self.wait(&mut life);
        }
    }

    /// Claims the volume for an administration operation: waits until it
    /// is settled, checks `allowed` against the state, and marks `op` in
    /// progress until the claim is dropped.
    pub fn claim(
        self: &Arc<Self>,
        op: OpName,
        allowed: impl FnOnce(&Life) -> Result<()>,
    ) -> Result<Claim> {
        let mut life = self.wait_settled()?;
        allowed(&life)?;
        life.op = Some(op);
        drop(life);
        Ok(Claim {
            volume: self.clone(),
            removed: false,
        })
    }
}

/// A change of a volume's config in progress (see
/// [`Volume::write_config`]). Use it through `Pool::update_config`, or,
/// when the publication must go with another step under the volume's lock
/// (the rename of a new committed image), [`ConfigWriter::current`] and
/// [`ConfigWriter::publish`].
pub(crate) struct ConfigWriter<'a> {
    volume: &'a Volume,
    _one: MutexGuard<'a, ()>,
}

impl ConfigWriter<'_> {
    /// The config as it is now: no other writer changes it meanwhile.
    pub fn current(&self) -> Arc<VolumeConfig> {
        self.volume.config()
    }

    /// Shows a stored config to readers, under `life` (already locked by
    /// the caller, who may rename an image in the same critical section).
    pub fn publish(&self, life: &mut Life, config: VolumeConfig) -> Arc<VolumeConfig> {
        let new = Arc::new(config);
        life.config = new.clone();
        new
    }
}

/// An administration operation in progress on a volume (see
/// [`Volume::claim`]). Dropping it ends the operation and wakes waiters.
pub(crate) struct Claim {
    pub volume: Arc<Volume>,
    removed: bool,
}

impl Claim {
    pub fn config(&self) -> Arc<VolumeConfig> {
        self.volume.config()
    }

    pub fn lock(&self) -> MutexGuard<'_, Life> {
        self.volume.lock()
    }

    /// Ends the claim by marking the volume removed: every waiter fails.
    pub fn finish_removed(mut self) {
        self.removed = true;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.removed {
            // Gone first, so that the hooks see it gone; waiters fail.
            let mut life = self.volume.lock();
            life.op = None;
            life.phase = Phase::Removed;
            drop(life);
            self.volume.changed();
        } else {
            // What the operation changed is announced before it shows as
            // done.
            self.volume.changed();
            self.volume.lock().op = None;
        }
        self.volume.notify();
    }
}

/// A lease on a volume's run: what an open file of its dirty image holds.
/// Give it back with [`super::Pool::release`].
pub struct Lease {
    pub vid: ValidVid,
    /// The dirty image, open read-write.
    pub file: Arc<File>,
    /// The run's size limit, shared: a resize changes it.
    pub limit: Arc<AtomicU64>,
    /// What was attached to the run at its start.
    pub attachment: Option<Attachment>,
    pub(crate) volume: Arc<Volume>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("vid", &self.vid).finish()
    }
}

/// The stop a last release asks for; run it with
/// [`super::Pool::finish_stop`], on a thread that may wait (a commit
/// fsyncs).
pub struct PendingStop {
    pub vid: ValidVid,
    pub(crate) volume: Arc<Volume>,
}

impl std::fmt::Debug for PendingStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingStop")
            .field("vid", &self.vid)
            .finish()
    }
}
