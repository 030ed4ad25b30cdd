//! The control protocol: a typed request for every §5 operation and a
//! typed response with its data, executed by the same function offline (the
//! CLI opens the pool itself) and online (the daemon serves them on
//! `POOL/.reflinkfs/control.sock`). Results are data; how they read to a
//! person is the CLI's business (`cli::output`), so a daemon left running
//! across an upgrade never decides the new CLI's output, and any other
//! client (the Qubes driver) gets data. `doc/CONTROL.md` documents it.

pub mod client;
#[cfg(test)]
mod doc_examples;
mod handlers;
mod imports;
mod protocol;
pub mod server;
mod status;
#[cfg(test)]
mod tests;
mod transfers;

pub use imports::{reap_stale_imports, BegunImport, PendingImports};
pub use protocol::*;
pub use status::*;

use crate::engine::{Pool, ValidVid};
use crate::error::{Error, Result};
use std::fs::File;

/// What only a running daemon knows.
pub trait Daemon: Send + Sync {
    /// `reflinkfs status`: mountpoint, I/O mode, running volumes, busy and
    /// held volumes, PID, uptime.
    fn status(&self) -> Status;
    /// Called after a volume was resized: tells the loop devices backed by
    /// its exported path the new capacity.
    fn resized(&self, vid: &ValidVid);
    /// Called after every request, before the reply: the mount has dropped
    /// what the kernel cached of what the request changed.
    fn settled(&self);
    /// What holds a volume's exported file open (loop devices, processes),
    /// for the error of a stop that waited in vain.
    fn holders(&self, vid: &ValidVid) -> String;
    /// The imports begun and not yet ended (`volume_import_begin`).
    fn imports(&self) -> &PendingImports;
}

/// A volume may be larger than the free space (its image is sparse, and
/// that is how thin provisioning works), but its creator should know: the
/// guest's writes fail with ENOSPC once the filesystem fills.
/// Reads an optional structured field of a reply leniently: a value this
/// build does not know (a newer daemon's new kind of change) reads as
/// `None`, and the prose field beside it still tells the person, instead
/// of failing the whole reply. (The same types on disk stay strict.)
fn lenient<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let raw = <Option<serde_json::Value> as serde::Deserialize>::deserialize(d)?;
    Ok(raw.and_then(|v| serde_json::from_value(v).ok()))
}

fn space_warning(pool: &Pool, vid: &ValidVid, size: u64) -> Option<String> {
    let st = pool.fs_stats().ok()?;
    let free = st.blocks_avail.saturating_mul(st.block_size);
    (size > free).then(|| {
        format!(
            "{vid} is {} but the pool's filesystem has {} free: the image is sparse, and writes to it will fail (ENOSPC) once the filesystem is full",
            crate::engine::size::format_approx(size),
            crate::engine::size::format_approx(free)
        )
    })
}

/// The daemon, for a request that only a mounted pool serves.
fn online<'a>(daemon: Option<&'a dyn Daemon>, what: &str) -> Result<&'a dyn Daemon> {
    daemon.ok_or_else(|| Error::InvalidValue {
        property: "request".into(),
        reason: format!(
            "{what} needs the pool to be mounted: its daemon keeps it between two requests"
        ),
    })
}

fn vid_of(pool: &Pool, input: &str) -> Result<ValidVid> {
    pool.resolve_vid(input)
}

/// `VM:NAME` for a new volume: the class of that VM's existing volumes.
fn new_vid(pool: &Pool, input: &str) -> Result<ValidVid> {
    if input.contains('/') {
        return input.parse();
    }
    if let Ok(v) = pool.resolve_vid(input) {
        return Ok(v);
    }
    let bad = |reason: &str| Error::InvalidVid {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    let (vm, name) = input.split_once(':').ok_or_else(|| {
        bad("expected CLASS/VM/NAME (for example appvms/work/private) or VM:NAME")
    })?;
    let mut classes: Vec<String> = pool
        .vids()
        .into_iter()
        .filter(|v| v.vm() == vm)
        .map(|v| v.class().to_owned())
        .collect();
    classes.dedup();
    match classes.as_slice() {
        [class] => ValidVid::new(class, vm, name),
        [] => Err(bad(
            "the VM has no volumes yet, so its class is unknown; give CLASS/VM/NAME",
        )),
        _ => Err(bad(
            "the VM name is used in several classes; give CLASS/VM/NAME",
        )),
    }
}

/// The file descriptor a request needs (an import's source, an export's
/// destination).
fn need_fd(fd: Option<File>) -> Result<File> {
    fd.ok_or_else(|| Error::InvalidValue {
        property: "request".into(),
        reason: "this operation needs a file descriptor passed with the request".into(),
    })
}

/// Executes a request against an open pool. `fd` is the file of an import
/// (its source) or export (its destination); `peer` the PID of the process
/// that sent it. Each request has its handler (`handlers.rs`, `imports.rs`,
/// `transfers.rs`).
pub fn execute(
    pool: &Pool,
    req: Request,
    fd: Option<File>,
    daemon: Option<&dyn Daemon>,
    peer: Option<i32>,
) -> Result<Response> {
    use handlers as h;
    match req {
        Request::PoolInfo => Ok(Response::PoolInfo(Box::new(pool.pool_info()?))),
        Request::PoolCheck { volume } => h::pool_check(pool, volume),
        Request::PoolSet { property, value } => h::pool_set(pool, &property, &value),
        Request::Status => Ok(h::status(pool, daemon)),
        Request::VolumeAttach {
            vid,
            read_only,
            direct_io,
            block_size,
        } => h::attach(pool, &vid, read_only, direct_io, block_size),
        Request::VolumeDetach {
            vid,
            force,
            timeout_ms,
        } => h::detach(pool, &vid, force, timeout_ms),
        req @ Request::VolumeCreate { .. } => h::create(pool, req, fd),
        Request::VolumeList => Ok(Response::Volumes(pool.list()?)),
        Request::VolumeInfo { vid, brief } => h::info(pool, &vid, brief),
        Request::VolumeImportBegin { vid, size } => imports::begin(pool, daemon, peer, &vid, size),
        Request::VolumeImportEnd { vid, success } => imports::end(pool, daemon, &vid, success),
        Request::VolumeImportAbort { vid } => imports::abort(pool, daemon, &vid),
        Request::VolumeWaitStopped { vid, timeout_ms } => {
            h::wait_stopped(pool, daemon, &vid, timeout_ms)
        }
        Request::VolumeRevisions { vid } => {
            Ok(Response::Revisions(pool.revisions(&vid_of(pool, &vid)?)?))
        }
        Request::VolumeResize {
            vid,
            size,
            allow_shrink,
        } => h::resize(pool, daemon, &vid, size, allow_shrink),
        Request::VolumeRevert { vid, revision } => h::revert(pool, &vid, revision.as_deref()),
        Request::VolumePin {
            vid,
            revision,
            note,
        } => h::pin(pool, &vid, &revision, Some(note)),
        Request::VolumeUnpin { vid, revision } => h::pin(pool, &vid, &revision, None),
        Request::VolumeDiscardChanges { vid } => h::discard_changes(pool, &vid),
        Request::VolumeCancelPending { vid } => h::cancel_pending(pool, &vid),
        Request::VolumeSet {
            vid,
            property,
            value,
        } => h::set(pool, &vid, property, value),
        req @ (Request::VolumeImport { .. }
        | Request::VolumeExport { .. }
        | Request::VolumeDiff { .. }
        | Request::VolumeExportDelta { .. }
        | Request::VolumeImportDelta { .. }) => transfers::execute(pool, req, fd),
        Request::VolumeClone { src, dst } => h::clone(pool, &src, &dst),
        Request::VolumeRemove { vid, force } => h::remove(pool, &vid, force),
    }
}
