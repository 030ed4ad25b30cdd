//! The control protocol: a typed request for every §5 operation and a
//! typed response with its data, executed by the same function offline (the
//! CLI opens the pool itself) and online (the daemon serves them on
//! `POOL/.reflinkfs/control.sock`). Results are data; how they read to a
//! person is the CLI's business (`cli::output`), so a daemon left running
//! across an upgrade never decides the new CLI's output, and any other
//! client (the Qubes driver) gets data. `doc/CONTROL.md` documents it.

pub mod client;
mod delta;
mod protocol;
pub mod server;

pub use protocol::*;

use crate::engine::admin::CreateOptions;
use crate::engine::transfer::PendingImport;
use crate::engine::{NewKind, Pool, PoolProperty, Property, RevertOutcome, ValidVid};
use crate::error::{Cause, Error, Result};
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

/// Imports begun over the socket and not yet ended, by volume. Kept by the
/// daemon: an import's data is written between two requests.
pub type PendingImports = parking_lot::Mutex<std::collections::HashMap<ValidVid, BegunImport>>;

/// An import begun over the socket, with the process that began it: the
/// import is that process's, and goes when it does.
pub struct BegunImport {
    import: PendingImport,
    owner: Option<Owner>,
}

/// The process a request came from.
struct Owner {
    pid: i32,
    /// Readable once that process has exited (`None`: it could not be had,
    /// and the import then lives until it is ended or aborted).
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl Owner {
    fn of(pid: i32) -> Owner {
        Owner {
            pid,
            pidfd: crate::sys::pidfd_open(pid).ok(),
        }
    }

    fn gone(&self) -> bool {
        use std::os::fd::AsFd;
        self.pidfd
            .as_ref()
            .is_some_and(|fd| crate::sys::pidfd_exited(fd.as_fd()))
    }
}

/// Drops the imports whose beginning process has exited (qubesd restarted,
/// its restore killed with it): each leaves its volume as it was. The
/// daemon calls it every second; the files are removed outside the lock.
pub fn reap_stale_imports(imports: &PendingImports) {
    let stale: Vec<(ValidVid, BegunImport)> = {
        let mut map = imports.lock();
        let gone: Vec<ValidVid> = map
            .iter()
            .filter(|(_, b)| b.owner.as_ref().is_some_and(Owner::gone))
            .map(|(v, _)| v.clone())
            .collect();
        gone.into_iter()
            .filter_map(|v| map.remove(&v).map(|b| (v, b)))
            .collect()
    };
    for (vid, b) in stale {
        let pid = b.owner.as_ref().map_or(0, |o| o.pid);
        log::warn!(
            "{vid}: the process that began its import (PID {pid}) has exited; dropping the import"
        );
        drop(b);
    }
}

/// Takes out the import pending on `vid` that a new begin from `peer`
/// replaces: one whose process has exited, or the same process's (a client
/// imports a volume once at a time: its earlier import was abandoned, as
/// when qubesd's restore was killed and is tried again). Another live
/// process's import stays, and the begin is refused.
fn take_replaced_import(
    imports: &PendingImports,
    vid: &ValidVid,
    peer: Option<i32>,
) -> Result<Option<BegunImport>> {
    let mut map = imports.lock();
    let Some(b) = map.get(vid) else {
        return Ok(None);
    };
    let owner = b.owner.as_ref();
    let replaceable = owner.is_none_or(|o| o.gone() || Some(o.pid) == peer);
    if !replaceable {
        return Err(Error::because(
            vid,
            Cause::Importing,
            format!(
                "an import into it begun by PID {} is in progress; `reflinkfs volume import --abort {vid}` drops it",
                owner.map_or(0, |o| o.pid)
            ),
        ));
    }
    Ok(map.remove(vid))
}

/// A volume may be larger than the free space (its image is sparse, and
/// that is how thin provisioning works), but its creator should know: the
/// guest's writes fail with ENOSPC once the filesystem fills.
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
/// (its source) or export (its destination).
pub fn execute(
    pool: &Pool,
    req: Request,
    fd: Option<File>,
    daemon: Option<&dyn Daemon>,
    peer: Option<i32>,
) -> Result<Response> {
    Ok(match req {
        Request::PoolInfo => Response::PoolInfo(Box::new(pool.pool_info()?)),
        Request::PoolCheck { volume } => {
            let only = volume.as_deref().map(|v| vid_of(pool, v)).transpose()?;
            Response::Problems(pool.check(only.as_ref())?)
        }
        Request::Status => Response::Status(Box::new(match daemon {
            Some(d) => d.status(),
            None => Status {
                pool: pool.path().display().to_string(),
                attached: pool
                    .activity()
                    .attached
                    .into_iter()
                    .map(|(v, a)| AttachedVolume::of(pool, &v, a))
                    .collect(),
                pending: PendingVolume::all(pool),
                ..Status::default()
            },
        })),
        Request::VolumeAttach {
            vid,
            read_only,
            direct_io,
            block_size,
        } => {
            let vid = vid_of(pool, &vid)?;
            let a = pool.attach(
                &vid,
                read_only,
                direct_io.unwrap_or(true),
                block_size.unwrap_or(512),
            )?;
            Response::Attached(AttachedVolume::of(pool, &vid, a))
        }
        Request::VolumeDetach {
            vid,
            force,
            timeout_ms,
        } => {
            let vid = vid_of(pool, &vid)?;
            let wait = std::time::Duration::from_millis(timeout_ms.unwrap_or(30_000));
            let d = pool.detach(&vid, force, wait)?;
            Response::Detached {
                vid: vid.to_string(),
                device: d.attached.device().display().to_string(),
                stop: d.stop.as_ref().map(stop_text),
            }
        }
        Request::VolumeCreate {
            vid,
            size,
            snapshot_of,
            volatile,
            revisions_to_keep,
            read_only,
            optional,
            with_data,
        } => {
            let vid = new_vid(pool, &vid)?;
            let kind = match (snapshot_of, volatile) {
                (Some(src), _) => NewKind::SnapshotOf(vid_of(pool, &src)?),
                (None, true) => NewKind::Volatile,
                (None, false) => NewKind::Origin,
            };
            let opts = CreateOptions {
                size,
                kind,
                rw: read_only.then_some(false),
                revisions_to_keep,
                optional,
            };
            match with_data {
                true => {
                    let data = need_fd(fd)?;
                    if !matches!(opts.kind, NewKind::Origin) {
                        return Err(Error::InvalidValue {
                            property: "with_data".into(),
                            reason: "only an origin volume is created with data".into(),
                        });
                    }
                    let shown = std::path::Path::new("the data passed with the request");
                    pool.create_with(&vid, &opts, Some((&data, shown)))?
                }
                false => pool.create(&vid, &opts)?,
            }
            Response::Created {
                warning: space_warning(pool, &vid, size),
                vid: vid.to_string(),
            }
        }
        Request::VolumeList => Response::Volumes(pool.list()?),
        Request::VolumeInfo { vid, brief } => {
            let vid = vid_of(pool, &vid)?;
            Response::Volume(Box::new(match brief {
                true => pool.info_brief(&vid)?,
                false => pool.info(&vid)?,
            }))
        }
        Request::PoolSet { property, value } => {
            let prop = PoolProperty::parse(&property, &value)?;
            pool.set_pool(prop)?;
            let (property, value) = prop.shown();
            Response::PoolSet {
                property: property.to_owned(),
                value,
            }
        }
        Request::VolumeImportBegin { vid, size } => {
            let d = online(daemon, "an import written in place")?;
            let vid = vid_of(pool, &vid)?;
            // An abandoned import is dropped first (its file removed),
            // outside the map's lock.
            if let Some(old) = take_replaced_import(d.imports(), &vid, peer)? {
                log::warn!("{vid}: a new import replaces one that was begun and never ended");
                drop(old);
            }
            let import = pool.import_begin(&vid, size)?;
            let path = import.path.display().to_string();
            let begun = BegunImport {
                import,
                owner: peer.map(Owner::of),
            };
            d.imports().lock().insert(vid.clone(), begun);
            Response::ImportBegun {
                vid: vid.to_string(),
                path,
                size,
            }
        }
        Request::VolumeImportEnd { vid, success } => {
            let d = online(daemon, "an import written in place")?;
            let vid = vid_of(pool, &vid)?;
            let import = d
                .imports()
                .lock()
                .remove(&vid)
                .ok_or_else(|| Error::Refused {
                    vid: vid.to_string(),
                    reason: "no import was begun (volume_import_begin) for it, or it was dropped (its writer's process exited, or `volume import --abort`)".into(),
                })?;
            let saved_as = pool.import_end(import.import, success)?;
            Response::ImportEnded {
                vid: vid.to_string(),
                committed: success,
                saved_as,
            }
        }
        Request::VolumeImportAbort { vid } => {
            let vid = vid_of(pool, &vid)?;
            let taken = daemon.and_then(|d| d.imports().lock().remove(&vid));
            let aborted = taken.is_some();
            if let Some(b) = taken {
                log::warn!(
                    "{vid}: import begun by PID {} aborted on request",
                    b.owner.as_ref().map_or(0, |o| o.pid)
                );
                drop(b);
            }
            Response::ImportAborted {
                vid: vid.to_string(),
                aborted,
            }
        }
        Request::VolumeWaitStopped { vid, timeout_ms } => {
            let vid = vid_of(pool, &vid)?;
            let timeout = std::time::Duration::from_millis(timeout_ms.unwrap_or(60_000));
            pool.wait_stopped(&vid, timeout)
                .map_err(|e| match (e, daemon) {
                    (
                        Error::Because {
                            vid: v,
                            cause: Cause::TimedOut,
                            reason,
                        },
                        Some(d),
                    ) => Error::because(
                        v,
                        Cause::TimedOut,
                        format!("{reason}: held by {}", d.holders(&vid)),
                    ),
                    (e, _) => e,
                })?;
            Response::Stopped {
                vid: vid.to_string(),
            }
        }
        Request::VolumeRevisions { vid } => {
            Response::Revisions(pool.revisions(&vid_of(pool, &vid)?)?)
        }
        Request::VolumeResize {
            vid,
            size,
            allow_shrink,
        } => {
            let vid = vid_of(pool, &vid)?;
            let outcome = pool.resize(&vid, size, allow_shrink)?;
            if let Some(d) = daemon {
                d.resized(&vid);
            }
            Response::Resized {
                warning: space_warning(pool, &vid, size),
                vid: vid.to_string(),
                size,
                outcome,
            }
        }
        Request::VolumeRevert { vid, revision } => {
            let vid = vid_of(pool, &vid)?;
            let (revision, saved_as, queued) =
                match pool.revert_or_queue(&vid, revision.as_deref())? {
                    RevertOutcome::Done { revision, saved_as } => (revision, saved_as, false),
                    RevertOutcome::Queued { revision } => (revision, None, true),
                };
            Response::Reverted {
                vid: vid.to_string(),
                revision,
                saved_as,
                queued,
            }
        }
        Request::VolumePin {
            vid,
            revision,
            note,
        } => {
            let vid = vid_of(pool, &vid)?;
            let (rev, changed) = pool.pin_revision(&vid, &revision, note)?;
            Response::Pinned {
                vid: vid.to_string(),
                revision: rev.id.to_string(),
                pinned: true,
                changed,
            }
        }
        Request::VolumeUnpin { vid, revision } => {
            let vid = vid_of(pool, &vid)?;
            let (rev, changed) = pool.unpin_revision(&vid, &revision)?;
            Response::Pinned {
                vid: vid.to_string(),
                revision: rev.id.to_string(),
                pinned: false,
                changed,
            }
        }
        Request::VolumeDiscardChanges { vid } => {
            let vid = vid_of(pool, &vid)?;
            pool.discard_changes(&vid)?;
            Response::Queued {
                vid: vid.to_string(),
                pending: crate::engine::Pending::Discard.describe(),
            }
        }
        Request::VolumeCancelPending { vid } => {
            let vid = vid_of(pool, &vid)?;
            Response::Cancelled {
                cancelled: pool.cancel_pending(&vid)?,
                vid: vid.to_string(),
            }
        }
        Request::VolumeSet {
            vid,
            property,
            value,
        } => {
            let vid = vid_of(pool, &vid)?;
            // A source may be given as VM:NAME too; it must exist.
            let value = match property.as_str() {
                "source" => vid_of(pool, &value)
                    .map_err(|e| match e {
                        Error::NoSuchVolume(s) => {
                            Error::NoSuchVolume(format!("{s} (the new source of {vid})"))
                        }
                        e => e,
                    })?
                    .to_string(),
                _ => value,
            };
            let prop = Property::parse(&property, &value)?;
            pool.set(&vid, prop)?;
            Response::Set {
                vid: vid.to_string(),
                property,
                value,
            }
        }
        Request::VolumeImport { vid, size, source } => {
            let file = need_fd(fd)?;
            let vid = vid_of(pool, &vid)?;
            let saved_as = pool.import(&vid, &file, size)?;
            Response::Imported {
                vid: vid.to_string(),
                source,
                saved_as,
            }
        }
        Request::VolumeExport {
            vid,
            revision,
            dest,
        } => {
            let file = need_fd(fd)?;
            let vid = vid_of(pool, &vid)?;
            let bytes = pool.export(&vid, &file, revision.as_deref())?;
            Response::Exported {
                vid: vid.to_string(),
                dest,
                bytes,
            }
        }
        req @ (Request::VolumeDiff { .. }
        | Request::VolumeExportDelta { .. }
        | Request::VolumeImportDelta { .. }) => delta::execute(pool, req, fd)?,
        Request::VolumeClone { src, dst } => {
            let src = vid_of(pool, &src)?;
            let dst = pool
                .resolve_vid(&dst)
                .or_else(|_| dst.parse::<ValidVid>())?;
            pool.clone_volume(&src, pool, &dst)?;
            Response::Cloned {
                src: src.to_string(),
                dst: dst.to_string(),
                pool: pool.path().display().to_string(),
            }
        }
        Request::VolumeRemove { vid, force } => {
            let vid = vid_of(pool, &vid)?;
            pool.remove_forced(&vid, force)?;
            Response::Removed {
                vid: vid.to_string(),
            }
        }
    })
}
