//! Human and JSON output of the CLI. The JSON is the engine's report types
//! serialised as they are, so it stays stable as long as they do.

use crate::engine::report::{PoolInfo, Problem, VolumeInfo};
use crate::engine::size::{format_approx, format_size};
use crate::engine::{ResizeOutcome, Revision};

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
            serde_json::to_value(v.state)
                .ok()
                .and_then(|s| s.as_str().map(str::to_owned))
                .unwrap_or_default(),
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
    let state = serde_json::to_value(v.state)
        .ok()
        .and_then(|s| s.as_str().map(str::to_owned))
        .unwrap_or_default();
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
    s.push_str(&format!("revisions:          {}\n", v.revisions.len()));
    for r in &v.revisions {
        s.push_str(&format!("  {:>6}  {}\n", r.id.to_string(), r.timestamp));
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

/// `reflinkfs status`, from the daemon's JSON.
pub fn status(v: &serde_json::Value) -> String {
    if v["mounted"] != true {
        return format!(
            "pool {} is not mounted\n",
            v["pool"].as_str().unwrap_or("?")
        );
    }
    let mountpoint = match (v["mountpoint"].as_str(), v["detached_from"].as_str()) {
        (Some(m), _) => m.to_owned(),
        (None, Some(old)) => format!(
            "none: lazily unmounted from {old}; the daemon serves the files still open and exits when they close"
        ),
        (None, None) => "?".to_owned(),
    };
    let mut s = format!(
        "pool:        {}\nmountpoint:  {}\nI/O mode:    {}\ndaemon:      PID {}, up {} s\n",
        v["pool"].as_str().unwrap_or("?"),
        mountpoint,
        v["io_mode"].as_str().unwrap_or("?"),
        v["pid"],
        v["uptime_seconds"],
    );
    let running = v["running"].as_array().cloned().unwrap_or_default();
    s.push_str(&format!("running:     {} volume(s)\n", running.len()));
    for r in running {
        s.push_str(&format!(
            "  {}  ({} open handle(s))\n",
            r["vid"].as_str().unwrap_or("?"),
            r["open_handles"]
        ));
    }
    let busy = v["busy"].as_array().cloned().unwrap_or_default();
    let busy: Vec<_> = busy.iter().filter(|b| b["state"] != "held").collect();
    s.push_str(&format!(
        "busy:        {} (a start, commit or operation in progress)\n",
        busy.len()
    ));
    for b in busy {
        s.push_str(&format!(
            "  {}  ({})\n",
            b["vid"].as_str().unwrap_or("?"),
            b["state"].as_str().unwrap_or("?")
        ));
    }
    let held = v["held"].as_array().cloned().unwrap_or_default();
    s.push_str(&format!(
        "held:        {} (closed, but still written outside reflinkfs; committed once that lets go)\n",
        held.len()
    ));
    for h in held {
        s.push_str(&format!("  {}\n", h.as_str().unwrap_or("?")));
    }
    s
}
