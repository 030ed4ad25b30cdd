//! The delta requests of protocol 1.4: `volume_diff`,
//! `volume_export_delta`, `volume_import_delta` (doc/DELTA.md).

use super::{need_fd, vid_of, Request, Response};
use crate::engine::delta::DeltaResponse;
use crate::engine::Pool;
use crate::error::Result;
use std::fs::File;

pub(super) fn execute(pool: &Pool, req: Request, fd: Option<File>) -> Result<Response> {
    let r = match req {
        Request::VolumeDiff { vid, from, to } => {
            let vid = vid_of(pool, &vid)?;
            DeltaResponse::Diff(pool.diff(&vid, &from, to.as_deref())?)
        }
        Request::VolumeExportDelta { vid, since, dest } => {
            let file = need_fd(fd)?;
            let vid = vid_of(pool, &vid)?;
            DeltaResponse::Exported(pool.export_delta(&vid, since.as_deref(), &file, &dest)?)
        }
        Request::VolumeImportDelta { vid, source } => {
            let file = need_fd(fd)?;
            let vid = vid_of(pool, &vid)?;
            DeltaResponse::Imported(pool.import_delta(&vid, &file, &source)?)
        }
        other => unreachable!("not a delta request: {other:?}"),
    };
    Ok(Response::Delta(Box::new(r)))
}
