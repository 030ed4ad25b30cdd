//! How `reflinkfs pool adopt` reads to a person: the rendering of an
//! [`AdoptReport`].

use crate::engine::adopt::{AdoptReport, AdoptedVolume, ConfigFrom};
use crate::engine::config::VolumeKind;
use crate::engine::revision::RevisionId;
use crate::engine::size::format_size;
use std::fmt::Write;

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The report as text.
pub fn text(report: &AdoptReport) -> String {
    let mut o = String::new();
    header(&mut o, report);
    let _ = writeln!(
        o,
        "\n{} volume{}:",
        report.volumes.len(),
        plural(report.volumes.len())
    );
    for v in &report.volumes {
        volume(&mut o, v);
    }
    files_and_problems(&mut o, report);
    o
}

/// What was adopted how, and where the volume configs came from.
fn header(o: &mut String, report: &AdoptReport) {
    let mode = if report.mode == "copy" {
        "copy mode"
    } else {
        "reflink mode"
    };
    if report.dry_run {
        let _ = writeln!(
            o,
            "dry run: adopting {} would make it a reflinkfs pool ({mode}); nothing was changed",
            report.pool
        );
    } else {
        let _ = writeln!(o, "adopted {} as a reflinkfs pool ({mode})", report.pool);
    }
    let _ = writeln!(o, "setup check: {}", report.setup_check);
    match &report.qubes_xml {
        Some(x) => {
            let pools: Vec<String> = report
                .xml_pools
                .iter()
                .map(|p| {
                    format!(
                        "pool {} (driver {}, dir_path {}, matched by {})",
                        p.name,
                        p.driver.as_deref().unwrap_or("?"),
                        p.dir_path.as_deref().unwrap_or("?"),
                        p.matched_by
                    )
                })
                .collect();
            let _ = writeln!(o, "volume configs: from {x}, {}", pools.join(", "));
        }
        None => {
            let _ = writeln!(
                    o,
                    "volume configs: inferred from the file names (no --qubes-xml); every guess is shown"
                );
        }
    }
    let _ = writeln!(o, "default revisions_to_keep: {}", report.revisions_to_keep);
}

/// One adopted volume: a line, and what was guessed or noted about it.
fn volume(o: &mut String, v: &AdoptedVolume) {
    let mut line = format!(
        "  {}  {}  {}  {}",
        v.vid,
        v.kind.as_str(),
        format_size(v.size),
        if v.rw { "rw" } else { "ro" }
    );
    if v.kind == VolumeKind::Origin {
        let _ = write!(
            line,
            "  revisions_to_keep={}  next_revision={}",
            v.revisions_to_keep, v.next_revision
        );
    }
    if let Some(s) = &v.source {
        let _ = write!(line, "  source={s}");
    }
    match (v.from, &v.qube) {
        (ConfigFrom::QubesXml, Some(q)) => {
            let _ = write!(line, "  [qubes.xml, qube {q}]");
        }
        (ConfigFrom::QubesXml, None) => line.push_str("  [qubes.xml]"),
        (ConfigFrom::Inferred, _) => line.push_str("  [guessed]"),
    }
    let _ = writeln!(o, "{line}");
    if let Some(g) = &v.guess {
        let _ = writeln!(o, "      guess: {g}");
    }
    if !v.revisions.is_empty() {
        let revs: Vec<String> = v
            .revisions
            .iter()
            .map(|r| match &r.id {
                RevisionId::Numbered(k) => format!("{k} ({})", r.timestamp),
                RevisionId::Legacy(ts) => format!("@{ts} (legacy name)"),
            })
            .collect();
        let _ = writeln!(o, "      revisions: {}", revs.join(", "));
    }
    for n in &v.notes {
        let _ = writeln!(o, "      note: {n}");
    }
}

/// What was left alone, removed, changed or found, and the pool check.
fn files_and_problems(o: &mut String, report: &AdoptReport) {
    if !report.not_adopted.is_empty() {
        let _ = writeln!(
            o,
            "\nnot adopted ({}), left alone:",
            report.not_adopted.len()
        );
        for n in &report.not_adopted {
            let _ = writeln!(o, "  {}: {}", n.vid, n.reason);
        }
    }
    let sections = [
        (
            if report.dry_run {
                "would remove"
            } else {
                "removed"
            },
            &report.removed,
        ),
        (
            if report.dry_run {
                "would set mode 0600 on"
            } else {
                "set mode 0600 on"
            },
            &report.chmod,
        ),
        (
            if report.dry_run {
                "recovery at the first open acts on"
            } else {
                "recovery at the first open acted on"
            },
            &report.recovery,
        ),
    ];
    for (title, list) in sections {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(o, "\n{title} {} file{}:", list.len(), plural(list.len()));
        for a in list {
            let _ = writeln!(o, "  {}: {}", a.path, a.reason);
        }
    }
    if !report.warnings.is_empty() {
        let _ = writeln!(
            o,
            "\n{} warning{}:",
            report.warnings.len(),
            plural(report.warnings.len())
        );
        for w in &report.warnings {
            let _ = writeln!(o, "  {w}");
        }
    }
    if !report.dry_run {
        if report.problems.is_empty() {
            let _ = writeln!(o, "\npool check: no problems");
        } else {
            let _ = writeln!(
                o,
                "\npool check: {} problem{}:",
                report.problems.len(),
                plural(report.problems.len())
            );
            for p in &report.problems {
                let _ = writeln!(o, "  {}: {}", p.path, p.problem);
            }
        }
    }
}
