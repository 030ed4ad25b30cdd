//! `reflinkfs volume ...`: each subcommand becomes one control request,
//! sent to the pool's daemon when it is mounted and run here when it is
//! not (see [`super::dispatch`]); the commands that move data (import,
//! export, diff, clone) also open the files and show progress.

use super::args::{self, VolumeCommand};
use super::{
    call, delta, dispatch, open_input, open_output, parse_revisions, precheck_vid, progress,
    same_dir, show, volume_info,
};
use crate::control::{Request, Response};
use crate::daemon::mounts;
use crate::engine::{parse_size, Property};
use crate::error::{Error, Result};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Runs a `volume` subcommand. Every volume id it names is checked before
/// the pool is touched.
pub(super) fn run(cmd: VolumeCommand) -> Result<ExitCode> {
    for v in vids_in(&cmd) {
        precheck_vid(v)?;
    }
    match cmd {
        VolumeCommand::Import {
            volume,
            abort: true,
            json,
            ..
        } => volume.send(|vid| Request::VolumeImportAbort { vid }, json.json),
        VolumeCommand::Import {
            volume,
            file: Some(file),
            delta: true,
            json,
            ..
        } => delta::import(&volume.pool.pool, volume.vid, &file, json.json),
        VolumeCommand::Diff {
            volume,
            from,
            to,
            json,
        } => volume.send(|vid| Request::VolumeDiff { vid, from, to }, json.json),
        VolumeCommand::Import {
            volume,
            file,
            size,
            json,
            ..
        } => {
            let file = file.expect("clap requires FILE without --abort");
            let size = size.as_deref().map(parse_size).transpose()?;
            let source = open_input(&file)?;
            let pool = &volume.pool.pool;
            let bar = import_progress(pool, &volume.vid, &file, &source, size);
            let req = Request::VolumeImport {
                vid: volume.vid,
                size,
                source: file.display().to_string(),
            };
            progress::during(bar, || dispatch(pool, req, Some(source), json.json))
        }
        VolumeCommand::Export {
            volume,
            file,
            revision,
            delta,
            since,
            json,
        } => {
            let (vid, dest) = (volume.vid, file.display().to_string());
            let req = match delta || since.is_some() {
                true => Request::VolumeExportDelta { vid, since, dest },
                false => Request::VolumeExport {
                    vid,
                    revision,
                    dest,
                },
            };
            export(&volume.pool.pool, &file, req, json.json)
        }
        VolumeCommand::Clone {
            pool,
            src_vid,
            dst_vid,
            to_pool,
            json,
        } => match to_pool {
            Some(tp) if !same_dir(&tp, &pool.pool) => {
                clone_across(&pool.pool, &src_vid, &tp, &dst_vid, json.json)
            }
            _ => dispatch(
                &pool.pool,
                Request::VolumeClone {
                    src: src_vid,
                    dst: dst_vid,
                },
                None,
                json.json,
            ),
        },
        other => administer(other),
    }
}

/// `volume export VID FILE` (or `-` for stdout): the committed image or a
/// revision, with progress on a terminal, or (`--delta`, `--since`) a
/// delta stream; a failed export leaves no partial FILE behind.
fn export(pool: &Path, file: &Path, req: Request, json: bool) -> Result<ExitCode> {
    let what = match req {
        Request::VolumeExportDelta { .. } => "the stream",
        _ => "the image",
    };
    super::export_into(file, json, what, |dest, to_stdout| {
        let bar = match &req {
            Request::VolumeExport { vid, .. } if !to_stdout => {
                export_progress(pool, vid, file, &dest)
            }
            _ => None,
        };
        progress::during(bar, || dispatch(pool, req, Some(dest), json))
    })
}

/// The subcommands that change or show a volume without moving its data.
fn administer(cmd: VolumeCommand) -> Result<ExitCode> {
    match cmd {
        VolumeCommand::Create(c) => {
            let req = Request::VolumeCreate {
                size: parse_size(&c.size)?,
                revisions_to_keep: parse_revisions(&c.revisions_to_keep)?,
                vid: c.vid,
                snapshot_of: c.snapshot_of,
                volatile: c.volatile,
                read_only: c.read_only,
                optional: c.optional,
                with_data: false,
            };
            dispatch(&c.pool.pool, req, None, c.json.json)
        }
        VolumeCommand::List { pool, json } => {
            dispatch(&pool.pool, Request::VolumeList, None, json.json)
        }
        VolumeCommand::Info(v) => v.dispatch(|vid| Request::VolumeInfo { vid, brief: false }),
        VolumeCommand::Revisions {
            pool,
            args,
            note,
            json,
        } => {
            let req = revisions_request(&args, note)?;
            dispatch(&pool.pool, req, None, json.json)
        }
        VolumeCommand::DiscardChanges(v) => v.dispatch(|vid| Request::VolumeDiscardChanges { vid }),
        VolumeCommand::CancelPending(v) => v.dispatch(|vid| Request::VolumeCancelPending { vid }),
        VolumeCommand::Resize {
            volume,
            size,
            allow_shrink,
            json,
        } => {
            let size = parse_size(&size)?;
            let req = |vid| Request::VolumeResize {
                vid,
                size,
                allow_shrink,
            };
            volume.send(req, json.json)
        }
        VolumeCommand::Revert {
            volume,
            revision,
            json,
        } => volume.send(|vid| Request::VolumeRevert { vid, revision }, json.json),
        VolumeCommand::Set {
            volume,
            set: args::PropertyArg { property, value },
            json,
        } => {
            // A source is a volume id, checked like the others (it may be
            // VM:NAME, which only the pool resolves).
            match property.as_str() {
                "source" => precheck_vid(&value).map_err(|e| Error::InvalidValue {
                    property: "source".into(),
                    reason: e.to_string(),
                })?,
                _ => drop(Property::parse(&property, &value)?),
            }
            let req = |vid| Request::VolumeSet {
                vid,
                property,
                value,
            };
            volume.send(req, json.json)
        }
        VolumeCommand::Remove { volume, force } => {
            volume.dispatch(|vid| Request::VolumeRemove { vid, force })
        }
        VolumeCommand::Attach {
            volume,
            read_only,
            direct_io,
            block_size,
            json,
        } => {
            let req = |vid| Request::VolumeAttach {
                vid,
                read_only,
                direct_io: Some(direct_io == "on"),
                block_size: block_size.parse().ok(),
            };
            volume.send(req, json.json)
        }
        VolumeCommand::Detach {
            volume,
            force,
            json,
        } => {
            let req = |vid| Request::VolumeDetach {
                vid,
                force,
                timeout_ms: None,
            };
            volume.send(req, json.json)
        }
        VolumeCommand::Import { .. }
        | VolumeCommand::Export { .. }
        | VolumeCommand::Diff { .. }
        | VolumeCommand::Clone { .. } => unreachable!("run() moves data itself"),
    }
}

/// The volume ids a command names, as typed.
fn vids_in(cmd: &VolumeCommand) -> Vec<&str> {
    match cmd {
        VolumeCommand::Create(c) => std::iter::once(c.vid.as_str())
            .chain(c.snapshot_of.as_deref())
            .collect(),
        VolumeCommand::List { .. } => Vec::new(),
        VolumeCommand::Info(v)
        | VolumeCommand::DiscardChanges(v)
        | VolumeCommand::CancelPending(v)
        | VolumeCommand::Remove { volume: v, .. } => vec![v.volume.vid.as_str()],
        VolumeCommand::Revisions { args, .. } => match args.as_slice() {
            [_, vid, _] | [vid] => vec![vid.as_str()],
            _ => Vec::new(),
        },
        VolumeCommand::Resize { volume, .. }
        | VolumeCommand::Revert { volume, .. }
        | VolumeCommand::Set { volume, .. }
        | VolumeCommand::Import { volume, .. }
        | VolumeCommand::Export { volume, .. }
        | VolumeCommand::Diff { volume, .. }
        | VolumeCommand::Attach { volume, .. }
        | VolumeCommand::Detach { volume, .. } => vec![volume.vid.as_str()],
        VolumeCommand::Clone {
            src_vid, dst_vid, ..
        } => vec![src_vid.as_str(), dst_vid.as_str()],
    }
}

impl args::VolumeArg {
    /// Runs the request `make` builds from the volume id.
    fn send(self, make: impl FnOnce(String) -> Request, json: bool) -> Result<ExitCode> {
        dispatch(&self.pool.pool, make(self.vid), None, json)
    }
}

impl args::VolumeRef {
    /// Runs the request `make` builds from the volume id.
    fn dispatch(self, make: impl FnOnce(String) -> Request) -> Result<ExitCode> {
        self.volume.send(make, self.json.json)
    }
}

/// `volume revisions VID`, `volume revisions pin VID K [--note TEXT]` or
/// `volume revisions unpin VID K`.
fn revisions_request(args: &[String], note: Option<String>) -> Result<Request> {
    let bad = |reason: &str| Error::InvalidValue {
        property: "volume revisions".into(),
        reason: reason.into(),
    };
    match (args, note) {
        ([vid], None) => Ok(Request::VolumeRevisions { vid: vid.clone() }),
        ([op, vid, k], note) if op == "pin" => Ok(Request::VolumePin {
            vid: vid.clone(),
            revision: k.clone(),
            note,
        }),
        ([op, vid, k], None) if op == "unpin" => Ok(Request::VolumeUnpin {
            vid: vid.clone(),
            revision: k.clone(),
        }),
        ([_], Some(_)) | ([_, _, _], Some(_)) => Err(bad("--note goes with `pin` only")),
        _ => Err(bad("give VID, or pin VID K, or unpin VID K")),
    }
}

/// The progress of an import from `file`, shown by the growth of the
/// volume's `N-import.img`, on a terminal.
fn import_progress(
    pool: &Path,
    vid: &str,
    file: &Path,
    source: &File,
    size: Option<u64>,
) -> Option<progress::Progress> {
    if !progress::wanted(false) {
        return None;
    }
    let total = crate::sys::fstat(source.as_fd())
        .ok()
        .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        .map(|st| st.st_blocks as u64 * 512)
        .or(size);
    // N.img -> N-import.img, in the file name only (a directory of the
    // pool's path may have ".img" in it too).
    let image = PathBuf::from(volume_info(pool, vid).ok()?.image);
    let stem = image.file_name()?.to_str()?.strip_suffix(".img")?;
    let target = image
        .with_file_name(format!("{stem}-import.img"))
        .display()
        .to_string();
    let label = format!("importing {}", file.display());
    Some(progress::Progress::start(
        label,
        total,
        progress::Watch::Path(target.into()),
    ))
}

/// The progress of an export to `file`, shown by the growth of `dest`, on
/// a terminal.
fn export_progress(pool: &Path, vid: &str, file: &Path, dest: &File) -> Option<progress::Progress> {
    if !progress::wanted(false) {
        return None;
    }
    let total = volume_info(pool, vid)
        .ok()
        .and_then(|v| v.usage)
        .and_then(|u| u.files.first().map(|f| f.usage.allocated));
    let watch = progress::Watch::Fd(dest.try_clone().ok()?);
    let label = format!("exporting to {}", file.display());
    Some(progress::Progress::start(label, total, watch))
}

/// A clone into another pool, each side online or offline: export the
/// source into a file beside the destination pool (a reflink when the two
/// share a filesystem), then create or import the destination from it.
fn clone_across(
    src_pool: &Path,
    src: &str,
    dst_pool: &Path,
    dst: &str,
    json: bool,
) -> Result<ExitCode> {
    let info = volume_info(src_pool, src)?;
    let size = info.size;
    let src_vid = info.vid.clone();
    let tmp_dir = dst_pool.join(crate::engine::pool::META_DIR);
    if !tmp_dir.is_dir() {
        let e = Error::NotAPool {
            path: dst_pool.to_owned(),
        };
        return Err(mounts::explain_not_a_pool(e, |pool| {
            format!("pass --to-pool {}", pool.display())
        }));
    }
    let tmp = tmp_dir.join(format!("clone~{}.img", std::process::id()));
    let result = (|| -> Result<String> {
        let dest = open_output(&tmp)?;
        call(
            src_pool,
            Request::VolumeExport {
                vid: src_vid.clone(),
                revision: None,
                dest: tmp.display().to_string(),
            },
            Some(dest),
        )?;
        let source =
            File::open(&tmp).map_err(|e| Error::io(format!("opening {}", tmp.display()), e))?;
        // A new volume is created with its data in one step, and an
        // existing one gets it as an import: either way, a clone that fails
        // leaves the destination pool as it was.
        let exists = volume_info(dst_pool, dst).is_ok();
        let req = match exists {
            true => Request::VolumeImport {
                vid: dst.to_owned(),
                size: Some(size),
                source: format!("{src_vid} of {}", src_pool.display()),
            },
            false => Request::VolumeCreate {
                vid: dst.to_owned(),
                size,
                snapshot_of: None,
                volatile: false,
                revisions_to_keep: None,
                read_only: false,
                optional: false,
                with_data: true,
            },
        };
        Ok(match call(dst_pool, req, Some(source))? {
            Response::Imported { vid, .. } | Response::Created { vid, .. } => vid,
            _ => dst.to_owned(),
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    let dst_vid = result?;
    let response = Response::Cloned {
        src: src_vid,
        dst: dst_vid,
        pool: dst_pool.display().to_string(),
    };
    Ok(show(&response, json))
}
