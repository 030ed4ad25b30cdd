//! Human and JSON output of the CLI. The JSON is the engine's report types
//! serialised as they are, so it stays stable as long as they do.

use crate::control::{Response, Status};
use crate::engine::report::{PoolInfo, Problem, VolumeInfo};
use crate::engine::size::{format_approx, format_size};
use crate::engine::{LifeState, Pending, ResizeOutcome, Revision};
use crate::error::ErrorClass;
use serde_json::{json, Value};

pub fn pool_info(p: &PoolInfo) -> String {
    let b = &p.backing;
    format!(
        "pool:               {}\n\
         mode:               {}\n\
         read-only:          {}\n\
         revisions_to_keep:  {} (default for new volumes)\n\
         volumes:            {} ({} running)\n\
         filesystem:         {}, {} total, {} used, {} available\n\
         pool allocation:    {} ({} shared between images by reflink)\n\
         created:            {}\n",
        p.path,
        if p.copy_mode {
            "copy (no reflinks: every snapshot is a full sparse copy)"
        } else {
            "reflink"
        },
        if p.read_only {
            "yes (kernel pool)"
        } else {
            "no"
        },
        p.revisions_to_keep,
        p.volumes,
        p.running,
        b.filesystem,
        format_approx(b.size),
        format_approx(b.used),
        format_approx(b.available),
        format_approx(p.pool_allocated),
        format_approx(p.pool_shared),
        p.created,
    )
}

pub fn problems(list: &[Problem]) -> String {
    if list.is_empty() {
        return "no problems found\n".into();
    }
    let mut s = String::new();
    for p in list {
        s.push_str(&format!(
            "{}: {}{}\n",
            p.vid.as_deref().unwrap_or("pool"),
            if p.path.is_empty() {
                String::new()
            } else {
                format!("{}: ", p.path)
            },
            p.problem
        ));
    }
    s.push_str(&format!("{} problem(s) found\n", list.len()));
    s
}

fn kind_name(v: &VolumeInfo) -> &'static str {
    v.kind.map(|k| k.as_str()).unwrap_or("?")
}

pub fn volume_list(list: &[VolumeInfo]) -> String {
    let mut rows = vec![[
        "VID".to_owned(),
        "TYPE".into(),
        "STATE".into(),
        "SIZE".into(),
        "RW".into(),
        "KEEP".into(),
        "REVS".into(),
        "SOURCE".into(),
    ]];
    for v in list {
        rows.push([
            v.vid.clone(),
            kind_name(v).into(),
            v.state.to_string(),
            format_size(v.size),
            if v.rw { "rw" } else { "ro" }.into(),
            v.revisions_to_keep.to_string(),
            v.revisions.len().to_string(),
            v.source.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

pub fn volume_info(v: &VolumeInfo) -> String {
    let state = v.state;
    let mut s = format!(
        "vid:                {}\n\
         type:               {}\n\
         state:              {state}\n\
         size:               {} ({} bytes)\n\
         rw:                 {}\n\
         revisions_to_keep:  {}\n\
         snap_on_start:      {}\n\
         save_on_stop:       {}\n\
         optional:           {}\n\
         image:              {}\n\
         next revision:      {}\n",
        v.vid,
        kind_name(v),
        format_size(v.size),
        v.size,
        v.rw,
        v.revisions_to_keep,
        v.snap_on_start,
        v.save_on_stop,
        v.optional,
        v.image,
        v.next_revision,
    );
    if let Some(src) = &v.source {
        s.push_str(&format!("source:             {src}\n"));
        if let Some(r) = &v.resolved_source {
            s.push_str(&format!("resolved source:    {r}\n"));
        }
    }
    if let Some(o) = v.is_outdated {
        s.push_str(&format!("is_outdated:        {o}\n"));
    }
    if let Some(p) = &v.problem {
        s.push_str(&format!("problem:            {p}\n"));
    }
    if let Some(p) = &v.pending {
        s.push_str(&format!("pending:            {}\n", p.describe()));
    }
    s.push_str(&format!("revisions:          {}\n", v.revisions.len()));
    for r in &v.revisions {
        let pin = match (&r.pin, r.exclusive) {
            (Some(_), Some(b)) => format!("  pinned, holds {} alone", format_approx(b)),
            (Some(_), None) => "  pinned".into(),
            _ => String::new(),
        };
        s.push_str(&format!(
            "  {:>6}  {}{pin}\n",
            r.id.to_string(),
            r.timestamp
        ));
    }
    if let Some(u) = &v.usage {
        s.push_str(&format!(
            "usage:              {} allocated, {} exclusive, {} shared\n",
            format_approx(u.total.allocated),
            format_approx(u.total.exclusive),
            format_approx(u.total.shared)
        ));
        for f in &u.files {
            s.push_str(&format!(
                "  {}: {} allocated, {} exclusive\n",
                f.file,
                format_approx(f.usage.allocated),
                format_approx(f.usage.exclusive)
            ));
        }
    }
    s
}

pub fn revisions(list: &[Revision]) -> String {
    if list.is_empty() {
        return "no revisions\n".into();
    }
    let mut s = String::from("REVISION  COMMITTED             FILE\n");
    for r in list {
        s.push_str(&format!(
            "{:<8}  {}  {}\n",
            r.id.to_string(),
            r.timestamp,
            r.file_name
        ));

        if let Some(p) = &r.pin {
            s.push_str(&format!(
                "          pinned {}{}{}\n",
                p.pinned_at,
                r.exclusive
                    .map(|b| format!(", holds {} alone", format_approx(b)))
                    .unwrap_or_default(),
                p.note
                    .as_deref()
                    .map(|n| format!(": {n}"))
                    .unwrap_or_default()
            ));
        }
    }
    s
}

pub fn resize_outcome(o: ResizeOutcome, size: u64) -> String {
    match o {
        ResizeOutcome::Unchanged => format!("already {} bytes; nothing to do", size),
        ResizeOutcome::Running => format!("running image resized to {size} bytes"),
        ResizeOutcome::Committed => format!("resized to {size} bytes"),
        ResizeOutcome::Nominal => {
            format!("size set to {size} bytes (takes effect at the next start)")
        }
    }
}

fn attached(s: &mut String, v: &Status) {
    if v.attached.is_empty() {
        return;
    }
    s.push_str(&format!(
        "attached:    {} (loop devices of `volume attach`)\n",
        v.attached.len()
    ));
    for a in &v.attached {
        s.push_str(&format!(
            "  {}  {}{}{}{}\n",
            a.vid,
            a.device.path,
            if a.read_only { ", read-only" } else { "" },
            if a.direct_io { ", direct I/O" } else { "" },
            a.device
                .block_size
                .filter(|&b| b != 512)
                .map(|b| format!(", {b}-byte blocks"))
                .unwrap_or_default()
        ));
    }
}

/// `reflinkfs status`.
pub fn status(v: &Status) -> String {
    if !v.mounted {
        let mut s = format!("pool {} is not mounted\n", v.pool);
        attached(&mut s, v);
        return s;
    }
    let mountpoint = match (&v.mountpoint, &v.detached_from) {
        (Some(m), _) => m.clone(),
        (None, Some(old)) if !v.waiting_for.is_empty() => format!(
            "none: unmounted from {old}; the daemon exits once it has committed {}, still open for writing outside reflinkfs",
            v.waiting_for.join(", ")
        ),
        (None, Some(old)) => format!(
            "none: lazily unmounted from {old}; the daemon serves the files still open and exits when they close"
        ),
        (None, None) => "?".to_owned(),
    };
    let mut s = format!(
        "pool:        {}\nmountpoint:  {}\nI/O mode:    {}\ndaemon:      PID {}, up {} s, protocol {}\n",
        v.pool,
        mountpoint,
        v.io_mode.map_or("?".into(), |m| m.to_string()),
        v.pid.map_or("?".into(), |p| p.to_string()),
        v.uptime_seconds.unwrap_or(0),
        v.protocol.as_deref().unwrap_or("?"),
    );
    s.push_str(&format!("running:     {} volume(s)\n", v.running.len()));
    for r in &v.running {
        s.push_str(&format!(
            "  {}  ({} open handle(s))\n",
            r.vid, r.open_handles
        ));
    }
    let busy: Vec<_> = v
        .busy
        .iter()
        .filter(|b| b.state != LifeState::Held)
        .collect();
    s.push_str(&format!(
        "busy:        {} (a start, commit or operation in progress)\n",
        busy.len()
    ));
    for b in busy {
        s.push_str(&format!("  {}  ({})\n", b.vid, b.state));
    }
    s.push_str(&format!(
        "held:        {} (closed, but still written outside reflinkfs; committed once that lets go)\n",
        v.held.len()
    ));
    for h in &v.held {
        s.push_str(&format!("  {h}\n"));
    }
    if !v.pending.is_empty() {
        s.push_str(&format!(
            "pending:     {} (a change queued for the end of the run)\n",
            v.pending.len()
        ));
        for p in &v.pending {
            let what = p
                .change
                .as_ref()
                .map_or(p.pending.clone(), Pending::describe);
            s.push_str(&format!("  {}  ({what})\n", p.vid));
        }
    }
    attached(&mut s, v);
    s
}

fn reverted(vid: &str, revision: &str, saved_as: Option<u64>, queued: bool) -> String {
    match (queued, saved_as) {
        (true, _) => format!(
            "{vid}: it is running: at its stop its changes are dropped and it goes back to {revision} (`volume cancel-pending` withdraws this)\n"
        ),
        (false, Some(k)) => {
            format!("{vid}: reverted to revision {revision}; the previous image is revision {k}\n")
        }
        (false, None) => format!("{vid}: reverted to revision {revision}\n"),
    }
}

fn import_ended(vid: &str, committed: bool, saved_as: Option<u64>) -> String {
    match (committed, saved_as) {
        (true, Some(k)) => {
            format!("{vid}: import committed; the previous image is revision {k}\n")
        }
        (true, None) => format!("{vid}: import committed\n"),
        (false, _) => format!("{vid}: import dropped; the volume is unchanged\n"),
    }
}

/// How a response reads to a person.
pub fn text(r: &Response) -> String {
    match r {
        Response::PoolInfo(p) => pool_info(p),
        Response::Problems(list) => problems(list),
        Response::Status(st) => status(st),
        Response::Created { vid, .. } => format!("created {vid}\n"),
        Response::Volumes(list) => volume_list(list),
        Response::Volume(v) => volume_info(v),
        Response::Revisions(list) => revisions(list),
        Response::Resized {
            vid, size, outcome, ..
        } => {
            format!("{vid}: {}\n", resize_outcome(*outcome, *size))
        }
        Response::Reverted {
            vid,
            revision,
            saved_as,
            queued,
        } => reverted(vid, revision, *saved_as, *queued),
        Response::Set {
            vid,
            property,
            value,
        } => format!("{vid}: {property} = {value}\n"),
        Response::Pinned {
            vid,
            revision,
            pinned,
            changed,
        } => match (pinned, changed) {
            (true, true) => format!("{vid}: revision {revision} pinned\n"),
            (true, false) => format!("{vid}: revision {revision} was pinned; note updated\n"),
            (false, true) => format!("{vid}: revision {revision} unpinned\n"),
            (false, false) => format!("{vid}: revision {revision} was not pinned\n"),
        },
        Response::Queued {
            vid,
            pending,
            change,
        } => format!(
            "{vid}: queued: {} (the VM runs on until then; `volume cancel-pending` withdraws it)\n",
            change.as_ref().map_or(pending.clone(), Pending::describe)
        ),
        Response::Cancelled {
            vid,
            cancelled: true,
        } => format!("{vid}: the queued change is withdrawn; the run will be committed\n"),
        Response::Cancelled {
            vid,
            cancelled: false,
        } => format!("{vid}: nothing was queued\n"),
        Response::Imported {
            vid,
            source,
            saved_as,
        } => format!(
            "{vid}: imported {source}{}\n",
            saved_as
                .map(|k| format!("; the previous image is revision {k}"))
                .unwrap_or_default()
        ),
        Response::Exported { vid, dest, bytes } => {
            if dest == "-" {
                String::new()
            } else {
                format!("{vid}: exported {bytes} bytes to {dest}\n")
            }
        }
        Response::Cloned { src, dst, pool } => format!("cloned {src} to {dst} in {pool}\n"),
        Response::Removed { vid } => format!("removed {vid}\n"),
        Response::PoolSet { property, value } => format!("pool: {property} = {value}\n"),
        Response::ImportBegun { vid, path, size } => {
            format!("{vid}: write {size} bytes to {path} in place, then end the import\n")
        }
        Response::ImportEnded {
            vid,
            committed,
            saved_as,
        } => import_ended(vid, *committed, *saved_as),
        Response::ImportAborted { vid, aborted: true } => {
            format!("{vid}: import dropped; the volume is unchanged\n")
        }
        Response::ImportAborted {
            vid,
            aborted: false,
        } => format!("{vid}: no import in progress\n"),
        Response::Stopped { vid } => format!("{vid}: stopped\n"),
        // The device alone, for `dev=$(reflinkfs volume attach …)`.
        Response::Attached(a) => format!("{}\n", a.device.path),
        Response::Delta(d) => super::delta::text(d),
        Response::Detached {
            vid,
            device,
            stop,
            outcome,
        } => format!(
            "{vid}: detached {device}; {}\n",
            // A daemon before 1.5 sends only the text.
            match (outcome, stop) {
                (Some(o), _) => o.to_string(),
                (None, Some(text)) => text.clone(),
                (None, None) => "it stays running: the mount still has it open".into(),
            }
        ),
    }
}

fn v<T: serde::Serialize + ?Sized>(x: &T) -> Value {
    serde_json::to_value(x).expect("responses serialise")
}

/// The `--json` output of a response: the same, online and offline.
pub fn json(r: &Response) -> Value {
    match r {
        Response::PoolInfo(p) => v(&**p),
        Response::Problems(list) => v(list),
        Response::Status(st) if !st.mounted => {
            json!({ "pool": st.pool, "mounted": false, "attached": st.attached })
        }
        Response::Status(st) => v(st),
        Response::Created { vid, warning } => {
            json!({ "vid": vid, "created": true, "warning": warning })
        }
        Response::Volumes(list) => v(list),
        Response::Volume(info) => v(&**info),
        Response::Revisions(list) => v(list),
        Response::Resized {
            vid,
            size,
            outcome,
            warning,
        } => json!({ "vid": vid, "size": size, "outcome": outcome, "warning": warning }),
        Response::Reverted {
            vid,
            revision,
            saved_as,
            queued,
        } => json!({ "vid": vid, "revision": revision, "saved_as": saved_as, "queued": queued }),
        Response::Queued {
            vid,
            pending,
            change,
        } => json!({ "vid": vid, "pending": pending, "change": change }),
        Response::Imported { vid, saved_as, .. } => json!({ "vid": vid, "saved_as": saved_as }),
        Response::Exported { vid, bytes, .. } => json!({ "vid": vid, "bytes": bytes }),
        Response::Removed { vid } => json!({ "vid": vid, "removed": true }),
        Response::Stopped { vid } => json!({ "vid": vid, "stopped": true }),
        Response::Attached(a) => v(a),
        // These send every field, always: their data as the protocol has it.
        Response::Pinned { .. }
        | Response::Cancelled { .. }
        | Response::Set { .. }
        | Response::Cloned { .. }
        | Response::PoolSet { .. }
        | Response::ImportBegun { .. }
        | Response::ImportEnded { .. }
        | Response::ImportAborted { .. } => v(r)["data"].take(),
        Response::Delta(d) => v(&**d),
        Response::Detached {
            vid,
            device,
            stop,
            outcome,
        } => {
            json!({ "vid": vid, "device": device, "stop": stop, "outcome": outcome })
        }
    }
}

/// What a person should hear about on stderr, whatever the output format.
pub fn warning(r: &Response) -> Option<&str> {
    match r {
        Response::Created { warning, .. } | Response::Resized { warning, .. } => warning.as_deref(),
        _ => None,
    }
}

/// The exit status a response gives: `pool check` that found problems
/// exits like corrupt metadata; everything else succeeded.
pub fn exit_code(r: &Response) -> u8 {
    match r {
        Response::Problems(list) if !list.is_empty() => ErrorClass::Corrupt.exit_code(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response whose `--json` is its protocol data has every field,
    /// `null` included: the output is the same, whatever the daemon.
    #[test]
    fn the_json_of_a_plain_response_is_its_data_with_every_field() {
        let ended = Response::ImportEnded {
            vid: "appvms/a/private".into(),
            committed: false,
            saved_as: None,
        };
        assert_eq!(
            json(&ended),
            json!({"vid": "appvms/a/private", "committed": false, "saved_as": null})
        );
        let set = Response::PoolSet {
            property: "revisions_to_keep".into(),
            value: "2".into(),
        };
        assert_eq!(
            json(&set),
            json!({"property": "revisions_to_keep", "value": "2"})
        );
    }
}
