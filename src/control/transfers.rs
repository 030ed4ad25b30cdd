//! The requests that move a volume's data through the file passed with
//! them: `volume_import`, `volume_export`, and the delta requests of
//! protocol 1.4 (`volume_export_delta`, `volume_import_delta`, with
//! `volume_diff`, which moves none; doc/DELTA.md).

use super::{need_fd, vid_of, Request, Response};
use crate::engine::delta::DeltaResponse;
use crate::engine::Pool;
use crate::error::Result;
use std::fs::File;

pub(super) fn execute(pool: &Pool, req: Request, fd: Option<File>) -> Result<Response> {
    if let Request::VolumeDiff { vid, from, to } = req {
        let vid = vid_of(pool, &vid)?;
        let diff = DeltaResponse::Diff(pool.diff(&vid, &from, to.as_deref())?);
        return Ok(Response::Delta(Box::new(diff)));
    }
    let file = need_fd(fd)?;
    let delta = match req {
        Request::VolumeImport { vid, size, source } => {
            let vid = vid_of(pool, &vid)?;
            let saved_as = pool.import(&vid, &file, size)?;
            let vid = vid.to_string();
            return Ok(Response::Imported {
                vid,
                source,
                saved_as,
            });
        }
        Request::VolumeExport {
            vid,
            revision,
            dest,
        } => {
            let vid = vid_of(pool, &vid)?;
            let bytes = pool.export(&vid, &file, revision.as_deref())?;
            let vid = vid.to_string();
            return Ok(Response::Exported { vid, dest, bytes });
        }
        Request::VolumeExportDelta { vid, since, dest } => {
            let vid = vid_of(pool, &vid)?;
            DeltaResponse::Exported(pool.export_delta(&vid, since.as_deref(), &file, &dest)?)
        }
        Request::VolumeImportDelta { vid, source } => {
            let vid = vid_of(pool, &vid)?;
            DeltaResponse::Imported(pool.import_delta(&vid, &file, &source)?)
        }
        other => unreachable!("moves no data: {other:?}"),
    };
    Ok(Response::Delta(Box::new(delta)))
}
