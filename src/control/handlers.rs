//! One handler per request of the control protocol (but the imports
//! written in place, `imports.rs`, and the requests that move data through
//! a passed file, `transfers.rs`): each resolves its volume ids, asks the
//! engine, and answers data.

use super::{
    need_fd, new_vid, space_warning, vid_of, AttachedVolume, Daemon, PendingVolume, Request,
    Response, Status, StopReport,
};
use crate::engine::admin::CreateOptions;
use crate::engine::{NewKind, Pending, Pool, PoolProperty, Property, RevertOutcome, ValidVid};
use crate::error::{Cause, Error, Result};
use std::fs::File;
use std::time::Duration;

/// How long `volume_wait_stopped` waits by default.
const WAIT_STOPPED_DEFAULT: Duration = Duration::from_secs(60);
/// How long `volume_detach` waits by default for the kernel to let go.
const DETACH_DEFAULT: Duration = Duration::from_secs(30);

fn wait_of(timeout_ms: Option<u64>, default: Duration) -> Duration {
    timeout_ms.map_or(default, Duration::from_millis)
}

pub(super) fn pool_check(pool: &Pool, volume: Option<String>) -> Result<Response> {
    let only = volume.as_deref().map(|v| vid_of(pool, v)).transpose()?;
    Ok(Response::Problems(pool.check(only.as_ref())?))
}

pub(super) fn pool_set(pool: &Pool, property: &str, value: &str) -> Result<Response> {
    let prop = PoolProperty::parse(property, value)?;
    pool.set_pool(prop)?;
    let (property, value) = prop.shown();
    Ok(Response::PoolSet {
        property: property.to_owned(),
        value,
    })
}

/// Online, the daemon's; offline, what the pool itself knows.
pub(super) fn status(pool: &Pool, daemon: Option<&dyn Daemon>) -> Response {
    Response::Status(Box::new(match daemon {
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
    }))
}

pub(super) fn attach(
    pool: &Pool,
    vid: &str,
    read_only: bool,
    direct_io: Option<bool>,
    block_size: Option<u32>,
) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    let a = pool.attach(
        &vid,
        read_only,
        direct_io.unwrap_or(true),
        block_size.unwrap_or(512),
    )?;
    Ok(Response::Attached(AttachedVolume::of(pool, &vid, a)))
}

pub(super) fn detach(
    pool: &Pool,
    vid: &str,
    force: bool,
    timeout_ms: Option<u64>,
) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    let d = pool.detach(&vid, force, wait_of(timeout_ms, DETACH_DEFAULT))?;
    let outcome = d.stop.as_ref().map(StopReport::from);
    Ok(Response::Detached {
        vid: vid.to_string(),
        device: d.attached.device().display().to_string(),
        stop: outcome.as_ref().map(StopReport::to_string),
        outcome,
    })
}

pub(super) fn create(pool: &Pool, req: Request, fd: Option<File>) -> Result<Response> {
    let Request::VolumeCreate {
        vid,
        size,
        snapshot_of,
        volatile,
        revisions_to_keep,
        read_only,
        optional,
        with_data,
    } = req
    else {
        unreachable!("not a create: {req:?}")
    };
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
    if with_data {
        let data = need_fd(fd)?;
        if !matches!(opts.kind, NewKind::Origin) {
            return Err(Error::InvalidValue {
                property: "with_data".into(),
                reason: "only an origin volume is created with data".into(),
            });
        }
        let shown = std::path::Path::new("the data passed with the request");
        pool.create_with(&vid, &opts, Some((&data, shown)))?
    } else {
        pool.create(&vid, &opts)?
    }
    Ok(Response::Created {
        warning: space_warning(pool, &vid, size),
        vid: vid.to_string(),
    })
}

pub(super) fn info(pool: &Pool, vid: &str, brief: bool) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    Ok(Response::Volume(Box::new(match brief {
        true => pool.info_brief(&vid)?,
        false => pool.info(&vid)?,
    })))
}

/// `volume_wait_stopped`; a timeout names, online, what holds the volume.
pub(super) fn wait_stopped(
    pool: &Pool,
    daemon: Option<&dyn Daemon>,
    vid: &str,
    timeout_ms: Option<u64>,
) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    let timeout = wait_of(timeout_ms, WAIT_STOPPED_DEFAULT);
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
    Ok(Response::Stopped {
        vid: vid.to_string(),
    })
}

pub(super) fn resize(
    pool: &Pool,
    daemon: Option<&dyn Daemon>,
    vid: &str,
    size: u64,
    allow_shrink: bool,
) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    let outcome = pool.resize(&vid, size, allow_shrink)?;
    if let Some(d) = daemon {
        d.resized(&vid);
    }
    Ok(Response::Resized {
        warning: space_warning(pool, &vid, size),
        vid: vid.to_string(),
        size,
        outcome,
    })
}

pub(super) fn revert(pool: &Pool, vid: &str, revision: Option<&str>) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    let (revision, saved_as, queued) = match pool.revert_or_queue(&vid, revision)? {
        RevertOutcome::Done { revision, saved_as } => (revision, saved_as, false),
        RevertOutcome::Queued { revision } => (revision, None, true),
    };
    Ok(Response::Reverted {
        vid: vid.to_string(),
        revision,
        saved_as,
        queued,
    })
}

/// `volume_pin` (`note: Some`, its note or none) and `volume_unpin`
/// (`note: None`).
pub(super) fn pin(
    pool: &Pool,
    vid: &str,
    revision: &str,
    note: Option<Option<String>>,
) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    let pinned = note.is_some();
    let (rev, changed) = match note {
        Some(note) => pool.pin_revision(&vid, revision, note)?,
        None => pool.unpin_revision(&vid, revision)?,
    };
    Ok(Response::Pinned {
        vid: vid.to_string(),
        revision: rev.id.to_string(),
        pinned,
        changed,
    })
}

pub(super) fn discard_changes(pool: &Pool, vid: &str) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    pool.discard_changes(&vid)?;
    Ok(Response::Queued {
        vid: vid.to_string(),
        pending: Pending::Discard.describe(),
        change: Some(Pending::Discard),
    })
}

pub(super) fn cancel_pending(pool: &Pool, vid: &str) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    Ok(Response::Cancelled {
        cancelled: pool.cancel_pending(&vid)?,
        vid: vid.to_string(),
    })
}

pub(super) fn set(pool: &Pool, vid: &str, property: String, value: String) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
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
    Ok(Response::Set {
        vid: vid.to_string(),
        property,
        value,
    })
}

/// A clone within this pool; the destination may be new (a full id) or
/// exist.
pub(super) fn clone(pool: &Pool, src: &str, dst: &str) -> Result<Response> {
    let src = vid_of(pool, src)?;
    let dst = pool.resolve_vid(dst).or_else(|_| dst.parse::<ValidVid>())?;
    pool.clone_volume(&src, pool, &dst)?;
    Ok(Response::Cloned {
        src: src.to_string(),
        dst: dst.to_string(),
        pool: pool.path().display().to_string(),
    })
}

pub(super) fn remove(pool: &Pool, vid: &str, force: bool) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    pool.remove_forced(&vid, force)?;
    Ok(Response::Removed {
        vid: vid.to_string(),
    })
}

impl PendingVolume {
    /// Every volume of `pool` with a queued change.
    pub fn all(pool: &Pool) -> Vec<PendingVolume> {
        pool.pending_changes()
            .into_iter()
            .map(|(v, p)| PendingVolume {
                vid: v.to_string(),
                pending: p.describe(),
                change: Some(p),
            })
            .collect()
    }
}
