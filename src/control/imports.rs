//! Imports written in place (`volume_import_begin`, `_end`, `_abort`): the
//! daemon keeps each begun import, with the process that began it, between
//! two requests.

use super::{online, vid_of, Daemon, Response};
use crate::engine::transfer::PendingImport;
use crate::engine::{Pool, ValidVid};
use crate::error::{Cause, Error, Result};

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

/// `volume_import_begin`: a sparse file of `size` bytes for the client to
/// write in place; the import is `peer`'s.
pub(super) fn begin(
    pool: &Pool,
    daemon: Option<&dyn Daemon>,
    peer: Option<i32>,
    vid: &str,
    size: u64,
) -> Result<Response> {
    let d = online(daemon, "an import written in place")?;
    let vid = vid_of(pool, vid)?;
    // An abandoned import is dropped first (its file removed), outside the
    // map's lock.
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
    Ok(Response::ImportBegun {
        vid: vid.to_string(),
        path,
        size,
    })
}

/// `volume_import_end`: commits the data written (`success`) or drops it.
pub(super) fn end(
    pool: &Pool,
    daemon: Option<&dyn Daemon>,
    vid: &str,
    success: bool,
) -> Result<Response> {
    let d = online(daemon, "an import written in place")?;
    let vid = vid_of(pool, vid)?;
    let import = d
        .imports()
        .lock()
        .remove(&vid)
        .ok_or_else(|| Error::Refused {
            vid: vid.to_string(),
            reason: "no import was begun (volume_import_begin) for it, or it was dropped (its writer's process exited, or `volume import --abort`)".into(),
        })?;
    let saved_as = pool.import_end(import.import, success)?;
    Ok(Response::ImportEnded {
        vid: vid.to_string(),
        committed: success,
        saved_as,
    })
}

/// `volume_import_abort`: drops the import begun on `vid`, whoever began it.
pub(super) fn abort(pool: &Pool, daemon: Option<&dyn Daemon>, vid: &str) -> Result<Response> {
    let vid = vid_of(pool, vid)?;
    let taken = daemon.and_then(|d| d.imports().lock().remove(&vid));
    let aborted = taken.is_some();
    if let Some(b) = taken {
        log::warn!(
            "{vid}: import begun by PID {} aborted on request",
            b.owner.as_ref().map_or(0, |o| o.pid)
        );
        drop(b);
    }
    Ok(Response::ImportAborted {
        vid: vid.to_string(),
        aborted,
    })
}
