//! The CLI of incremental import, `volume import --delta`, and the text of
//! `volume diff`, `volume export --delta/--since` and that import
//! (doc/DELTA.md). The export is `volume export`'s, with its own request.

use super::{dispatch, open_input};
use crate::control::Request;
use crate::engine::delta::DeltaResponse;
use crate::error::Result;
use std::path::Path;
use std::process::ExitCode;

/// `volume import VID --delta FILE|-`.
pub(super) fn import(pool: &Path, vid: String, file: &Path, json: bool) -> Result<ExitCode> {
    let source = open_input(file)?;
    let req = Request::VolumeImportDelta {
        vid,
        source: file.display().to_string(),
    };
    dispatch(pool, req, Some(source), json)
}

fn id_or_none(id: &Option<String>) -> &str {
    id.as_deref().unwrap_or("no id")
}

/// `VID: VERB FROM -> TO`: the ids a delta stream goes between.
fn span(vid: &str, verb: &str, from_id: &Option<String>, to_id: &str) -> String {
    let from = from_id.as_deref().unwrap_or("(whole image)");
    format!("{vid}: {verb} {from} -> {to_id}")
}

/// What a stream's records carry: data, and ranges of zeros.
fn carried(data: u64, zero: u64) -> String {
    format!("{data} bytes of data, {zero} of zeros")
}

/// `(METHOD, N bytes read)`: how the changes were found.
fn found_by(method: &str, bytes_read: u64) -> String {
    format!("({method}, {bytes_read} bytes read)")
}

/// The human output of a delta response.
pub(super) fn text(d: &DeltaResponse) -> String {
    match d {
        DeltaResponse::Diff(r) => {
            let mut s = format!(
                "{}: {} ({}) -> {} ({}): {} bytes changed in {} ranges {}\n",
                r.vid,
                r.from,
                id_or_none(&r.from_id),
                r.to,
                id_or_none(&r.to_id),
                r.changed_bytes,
                r.ranges.len(),
                found_by(&r.method, r.bytes_read)
            );
            if r.from_size != r.to_size {
                s.push_str(&format!("size: {} -> {} bytes\n", r.from_size, r.to_size));
            }
            for [off, len] in &r.ranges {
                s.push_str(&format!("{off} {len}\n"));
            }
            s
        }
        // The stream itself went to stdout: say nothing there.
        DeltaResponse::Exported(r) if r.dest == "-" => String::new(),
        DeltaResponse::Exported(r) => {
            let ids = span(&r.vid, "exported", &r.from_id, &r.to_id);
            let data = carried(r.data_bytes, r.zero_bytes);
            let how = found_by(&r.method, r.bytes_read);
            let (dest, records, bytes) = (&r.dest, r.records, r.stream_bytes);
            format!("{ids} to {dest}: {data}, {records} records, {bytes} bytes {how}\n")
        }
        DeltaResponse::Imported(r) => {
            let ids = span(&r.vid, "applied", &r.from_id, &r.to_id);
            let data = carried(r.data_bytes, r.zero_bytes);
            let kept = match r.saved_as {
                Some(k) => format!("; the previous image is revision {k}"),
                None => String::new(),
            };
            let (source, size, id) = (&r.source, r.size, &r.to_id);
            format!("{ids} from {source}: {data}; now {size} bytes, id {id}{kept}\n")
        }
    }
}
