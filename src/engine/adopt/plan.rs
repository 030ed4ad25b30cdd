//! Phase 1, the plan: the volume configs, from qubes.xml or inferred from
//! the file names, checked across volumes; then the file actions.

use super::qubes_xml::{QubesXml, VolAttrs, XmlPoolDef};
use super::scan::{Scan, VolFiles};
use super::{reason_of, AdoptReport, ConfigFrom, FileAction, NotAdopted};
use crate::engine::config::{PoolConfig, VolumeConfig, VolumeKind};
use crate::engine::size::check_size;
use crate::engine::vid::ValidVid;
use crate::error::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// How long a source chain may be before it is called a loop (as in the
/// engine's own resolution).
const MAX_SOURCE_DEPTH: usize = 32;

/// A volume config before the cross-volume checks.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    kind: VolumeKind,
    /// `None` for a snapshot whose size follows its source.
    size: Option<u64>,
    rw: bool,
    revisions_to_keep: i64,
    source: Option<ValidVid>,
    pub(super) from: ConfigFrom,
    pub(super) qube: Option<String>,
    pub(super) guess: Option<String>,
    pub(super) notes: Vec<String>,
}

#[derive(Debug, Default)]
pub(super) struct Plan {
    pub(super) pool: Option<PoolConfig>,
    pub(super) configs: BTreeMap<ValidVid, VolumeConfig>,
    pub(super) report: AdoptReport,
    /// (vid, file, reason) of the files to remove.
    pub(super) removals: Vec<(ValidVid, String, String)>,
    /// (vid, file, old mode) of the files to chmod 0600.
    pub(super) chmods: Vec<(ValidVid, String, u32)>,
    /// A named-file reflink check is needed (no O_TMPFILE here).
    pub(super) named_check: bool,
}

fn not_adopted(report: &mut AdoptReport, vid: impl ToString, reason: impl Into<String>) {
    report.not_adopted.push(NotAdopted {
        vid: vid.to_string(),
        reason: reason.into(),
    });
}

/// How many revisions an origin keeps by default when inferred: the pool
/// default, or more so that no revision found (nor the one a recovery
/// commit adds) is pruned by the next commit.
fn inferred_keep(default: i64, files: &VolFiles) -> i64 {
    let pending = usize::from(files.dirty.is_some() && files.clean.is_some());
    default.max((files.revisions.len() + pending) as i64)
}

/// The size an origin takes from its image, checked.
fn origin_size(vid: &ValidVid, files: &VolFiles) -> std::result::Result<(u64, bool), String> {
    let (meta, from_dirty) = match (files.clean, files.dirty) {
        (Some(c), _) => (c, false),
        (None, Some(d)) => (d, true),
        (None, None) => {
            return Err(format!(
                "no image ({}.img) to adopt{}",
                vid.name(),
                if files.revisions.is_empty() {
                    ""
                } else {
                    "; it has only revisions"
                }
            ))
        }
    };
    if meta.size == 0 || meta.size % 512 != 0 {
        return Err(format!(
            "its image is {} bytes, not a positive multiple of 512",
            meta.size
        ));
    }
    Ok((meta.size, from_dirty))
}

/// A candidate inferred from the file names, with the guess that made it.
fn base(kind: VolumeKind, size: Option<u64>, keep: i64, guess: String) -> Candidate {
    Candidate {
        kind,
        size,
        rw: true,
        revisions_to_keep: keep,
        source: None,
        from: ConfigFrom::Inferred,
        qube: None,
        guess: Some(guess),
        notes: Vec::new(),
    }
}

/// A volume named `volatile`, sized by its leftover image; or why it is
/// not adopted.
fn infer_volatile(files: &VolFiles) -> std::result::Result<Candidate, String> {
    let Some(m) = files.dirty.or(files.clean) else {
        return Err(
            "a volatile volume with no image to take its size from; give --qubes-xml".into(),
        );
    };
    if m.size == 0 || m.size % 512 != 0 {
        return Err(format!(
            "its image is {} bytes, not a positive multiple of 512",
            m.size
        ));
    }
    let mut c = base(
        VolumeKind::Volatile,
        Some(m.size),
        0,
        "a volume named volatile is volatile (emptied at every start); size from its leftover image".into(),
    );
    if !files.revisions.is_empty() {
        c.notes
            .push("its revisions are left alone; a volatile volume has none".into());
    }
    Ok(c)
}

/// Configs inferred from the file names (no qubes.xml).
pub(super) fn infer(
    scan: &Scan,
    default_keep: i64,
    report: &mut AdoptReport,
) -> BTreeMap<ValidVid, Candidate> {
    let mut out = BTreeMap::new();
    // Clean images by inode, to recognise a snapshot's hard link of its
    // template's root (what Qubes 4.1+ leaves while an AppVM runs).
    let mut by_inode: BTreeMap<(u64, u64), Vec<&ValidVid>> = BTreeMap::new();
    for (vid, f) in &scan.vols {
        if let Some(c) = f.clean {
            by_inode.entry((c.dev, c.ino)).or_default().push(vid);
        }
    }
    for (vid, files) in &scan.vols {
        let is_template_root = vid.class() == "vm-templates" && vid.name() == "root";
        if vid.name() == "volatile" {
            match infer_volatile(files) {
                Ok(c) => drop(out.insert(vid.clone(), c)),
                Err(reason) => not_adopted(report, vid, reason),
            }
            continue;
        }
        // A clean image that is the same file as a template's root image is
        // the snapshot a running (or crashed) AppVM left.
        if let Some(c) = files.clean {
            let template_twin = by_inode.get(&(c.dev, c.ino)).and_then(|vids| {
                vids.iter()
                    .find(|o| **o != vid && o.class() == "vm-templates")
                    .copied()
            });
            if let (Some(src), false) = (template_twin, is_template_root) {
                let mut cand = base(
                    VolumeKind::Snapshot,
                    None,
                    0,
                    format!(
                        "{}.img is a hard link of {src}'s image: a snapshot of {src} left by a running or crashed qube",
                        vid.name()
                    ),
                );
                cand.source = Some(src.clone());
                out.insert(vid.clone(), cand);
                continue;
            }
        }
        if vid.name() == "root" && !is_template_root && files.clean.is_none() {
            not_adopted(
                report,
                vid,
                "a root volume outside vm-templates without an image of its own is a snapshot of its template's root, and which template is not known from the files; give --qubes-xml",
            );
            continue;
        }
        let (size, from_dirty) = match origin_size(vid, files) {
            Ok(s) => s,
            Err(reason) => {
                not_adopted(report, vid, reason);
                continue;
            }
        };
        let guess = if vid.name() == "private" {
            "a private volume is an origin (kept across restarts)".to_owned()
        } else if is_template_root {
            "a template's root volume is an origin".to_owned()
        } else {
            format!(
                "a {} volume with an image of its own is taken to be an origin (a guess: give --qubes-xml to be sure)",
                vid.name()
            )
        };
        let keep = inferred_keep(default_keep, files);
        let mut c = base(VolumeKind::Origin, Some(size), keep, guess);
        if keep > default_keep {
            c.notes.push(format!(
                "revisions_to_keep={keep} (the default is {default_keep}): as many as the revisions found{}",
                if files.dirty.is_some() && files.clean.is_some() {
                    ", with the one recovery's commit adds"
                } else {
                    ""
                }
            ));
        }
        if from_dirty {
            c.notes.push(format!(
                "only {}-dirty.img exists; recovery makes it the image",
                vid.name()
            ));
        }
        out.insert(vid.clone(), c);
    }
    out
}

/// Configs from the `volume` elements of the chosen pools.
pub(super) fn from_xml(
    xml: &QubesXml,
    xml_path: &Path,
    pools: &[XmlPoolDef],
    default_keep: i64,
    scan: &Scan,
    report: &mut AdoptReport,
) -> Result<BTreeMap<ValidVid, Candidate>> {
    let mut out: BTreeMap<ValidVid, Candidate> = BTreeMap::new();
    let mut listed = BTreeSet::new();
    for v in &xml.volumes {
        let Some(pool) = &v.pool else { continue };
        if !pools.iter().any(|p| &p.name == pool) {
            continue;
        }
        let qube = v.qube.clone();
        let Some(raw_vid) = &v.vid else {
            report
                .warnings
                .push(format!("{} in pool {pool} has no vid; skipped", v.who()));
            continue;
        };
        let vid = match raw_vid
            .parse::<ValidVid>()
            .and_then(|v| v.check_new().map(|()| v))
        {
            Ok(vid) => vid,
            Err(e) => {
                not_adopted(
                    report,
                    raw_vid,
                    format!("not a valid volume id: {}", reason_of(e)),
                );
                continue;
            }
        };
        if !listed.insert(vid.clone()) {
            report.warnings.push(format!(
                "{vid} is listed more than once in qubes.xml; the first one is used"
            ));
            continue;
        }
        let VolAttrs {
            rw,
            save_on_stop,
            snap_on_start,
            size,
            revisions_to_keep: keep,
        } = v.attrs(xml_path)?;
        let Some(kind) = VolumeKind::from_flags(snap_on_start, save_on_stop) else {
            not_adopted(
                report,
                &vid,
                "snap_on_start and save_on_stop are both True, which no reflinkfs volume type allows",
            );
            continue;
        };
        let empty = VolFiles::default();
        let files = scan.vols.get(&vid).unwrap_or(&empty);
        let mut notes = Vec::new();
        let shape = match kind {
            VolumeKind::Origin => xml_origin(&vid, files, size, keep, default_keep, &mut notes),
            VolumeKind::Snapshot => xml_snapshot(v.source.as_deref(), size, keep, &mut notes),
            VolumeKind::Volatile => xml_volatile(files, size, keep, &mut notes),
        };
        let (size, keep, source) = match shape {
            Ok(s) => s,
            Err(reason) => {
                not_adopted(report, &vid, reason);
                continue;
            }
        };
        if kind != VolumeKind::Snapshot && v.source.is_some() {
            notes.push(
                "qubes.xml gives a source; only snapshot volumes have one, so it is dropped".into(),
            );
        }
        out.insert(
            vid,
            Candidate {
                kind,
                size,
                rw,
                revisions_to_keep: keep,
                source,
                from: ConfigFrom::QubesXml,
                qube,
                guess: None,
                notes,
            },
        );
    }
    unlisted(scan, &listed, pools, report);
    Ok(out)
}

/// What a volume of qubes.xml becomes: its size, revisions_to_keep and
/// source, or why it is not adopted.
type Shape = std::result::Result<(Option<u64>, i64, Option<ValidVid>), String>;

/// An origin volume of qubes.xml: the size of its image, and no fewer
/// revisions to keep than it has.
fn xml_origin(
    vid: &ValidVid,
    files: &VolFiles,
    size: Option<u64>,
    keep: Option<i64>,
    default_keep: i64,
    notes: &mut Vec<String>,
) -> Shape {
    let (actual, from_dirty) = match origin_size(vid, files) {
        Ok(s) => s,
        Err(reason) => {
            return Err(reason);
        }
    };
    if let Some(s) = size.filter(|s| *s != actual) {
        notes.push(format!(
            "qubes.xml says size {s}; the image's size {actual} is used"
        ));
    }
    if from_dirty {
        notes.push(format!(
            "only {}-dirty.img exists; recovery makes it the image",
            vid.name()
        ));
    }
    let mut keep = keep.unwrap_or(default_keep);
    let pending = usize::from(files.dirty.is_some() && files.clean.is_some());
    let found = files.revisions.len() + pending;
    if keep >= 0 && found as i64 > keep {
        // Adopt deletes no revision: opening the pool would
        // prune down to revisions_to_keep at once.
        notes.push(format!(
                "{found} revision(s){} but revisions_to_keep={keep} in qubes.xml: raised to {found} so that none is deleted; lower it with `volume set`, which prunes the oldest (legacy names first)",
                if pending == 1 { " with the recovery commit" } else { "" }
            ));
        keep = found as i64;
    }
    Ok((Some(actual), keep, None))
}

/// A snapshot volume of qubes.xml: its source, and no revisions.
fn xml_snapshot(
    source: Option<&str>,
    size: Option<u64>,
    keep: Option<i64>,
    notes: &mut Vec<String>,
) -> Shape {
    let Some(src) = source else {
        return Err("snap_on_start=True but qubes.xml gives no source".into());
    };
    let src = match src.parse::<ValidVid>() {
        Ok(s) => s,
        Err(e) => {
            return Err(format!(
                "its source {src:?} is not a valid volume id: {}",
                reason_of(e)
            ));
        }
    };
    if keep.is_some_and(|k| k != 0) {
        notes.push(format!(
            "qubes.xml says revisions_to_keep={}; a snapshot volume keeps none",
            keep.unwrap_or(0)
        ));
    }
    let size = size.filter(|s| check_size(*s, &s.to_string()).is_ok());
    Ok((size, 0, Some(src)))
}

/// A volatile volume of qubes.xml: its size, from qubes.xml or its
/// leftover image, and no revisions.
fn xml_volatile(
    files: &VolFiles,
    size: Option<u64>,
    keep: Option<i64>,
    notes: &mut Vec<String>,
) -> Shape {
    let size = match size {
        Some(s) if check_size(s, &s.to_string()).is_ok() => s,
        other => match files.dirty.or(files.clean) {
            Some(m) if m.size > 0 && m.size % 512 == 0 => {
                notes.push(format!(
                    "qubes.xml gives {}; the size of its leftover image is used",
                    other
                        .map(|s| format!("size {s}, not a positive multiple of 512"))
                        .unwrap_or_else(|| "no size".into())
                ));
                m.size
            }
            _ => {
                return Err("a volatile volume without a valid size in qubes.xml".into());
            }
        },
    };
    if keep.is_some_and(|k| k != 0) {
        notes.push(format!(
            "qubes.xml says revisions_to_keep={}; a volatile volume keeps none",
            keep.unwrap_or(0)
        ));
    }
    Ok((Some(size), 0, None))
}

/// Files of volumes qubes.xml does not list in the chosen pools are not
/// adopted.
fn unlisted(
    scan: &Scan,
    listed: &BTreeSet<ValidVid>,
    pools: &[XmlPoolDef],
    report: &mut AdoptReport,
) {
    for (vid, files) in &scan.vols {
        if listed.contains(vid) {
            continue;
        }
        if files.has_any_image() || files.precache.is_some() {
            not_adopted(
                report,
                vid,
                format!(
                    "qubes.xml lists no such volume in pool {}",
                    pools
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
}

/// Follows a snapshot's source chain among the candidates, down to an
/// origin (like [`Pool::resolve_source`](crate::engine::Pool::resolve_source),
/// before there is a pool).
fn resolve_among(
    vid: &ValidVid,
    cands: &BTreeMap<ValidVid, Candidate>,
) -> std::result::Result<ValidVid, String> {
    let mut cur = cands
        .get(vid)
        .and_then(|c| c.source.clone())
        .ok_or("a snapshot volume needs a source")?;
    for _ in 0..MAX_SOURCE_DEPTH {
        if cur == *vid {
            break;
        }
        match cands.get(&cur) {
            None => {
                return Err(format!(
                    "its source {cur} is not adopted (not a volume of this pool, or left out above)"
                ))
            }
            Some(c) => match c.kind {
                VolumeKind::Origin => return Ok(cur),
                VolumeKind::Volatile => {
                    return Err(format!(
                        "its source {cur} is a volatile volume, which has no committed image"
                    ))
                }
                VolumeKind::Snapshot => {
                    cur = c
                        .source
                        .clone()
                        .ok_or("a snapshot in its chain has no source")?
                }
            },
        }
    }
    Err(format!(
        "its source chain is longer than {MAX_SOURCE_DEPTH} or loops"
    ))
}

/// Drops snapshots whose chain does not end at an adopted origin, sets the
/// sizes that follow a source, and validates every config, until nothing
/// changes.
pub(super) fn finish_configs(
    mut cands: BTreeMap<ValidVid, Candidate>,
    pool: &PoolConfig,
    scan: &Scan,
    report: &mut AdoptReport,
) -> BTreeMap<ValidVid, (VolumeConfig, Candidate)> {
    loop {
        let mut dropped = false;
        let snapshots: Vec<ValidVid> = cands
            .iter()
            .filter(|(_, c)| c.kind == VolumeKind::Snapshot)
            .map(|(v, _)| v.clone())
            .collect();
        for vid in snapshots {
            if let Err(reason) = resolve_among(&vid, &cands) {
                cands.remove(&vid);
                not_adopted(report, &vid, reason);
                dropped = true;
            }
        }
        if dropped {
            continue;
        }
        let mut out = BTreeMap::new();
        for (vid, c) in &cands {
            let size = match c.size {
                Some(s) => s,
                None => {
                    let origin = resolve_among(vid, &cands).expect("resolved above");
                    cands[&origin].size.expect("origins have a size")
                }
            };
            let next_revision = scan.vols.get(vid).map(VolFiles::next_revision).unwrap_or(1);
            let cfg = VolumeConfig {
                rw: c.rw,
                revisions_to_keep: c.revisions_to_keep,
                source: c.source.clone(),
                next_revision,
                ..VolumeConfig::new(vid.clone(), c.kind, size)
            };
            if let Err(reason) = cfg.validate(pool) {
                not_adopted(report, vid, reason);
                dropped = true;
                continue;
            }
            out.insert(vid.clone(), (cfg, c.clone()));
        }
        if !dropped {
            return out;
        }
        cands.retain(|v, _| out.contains_key(v));
    }
}

/// The removals, mode changes and recovery steps for the adopted volumes,
/// and the `-cow.img` leftovers of every volume.
pub(super) fn file_actions(root: &Path, scan: &Scan, plan: &mut Plan) {
    let shown = |vid: &ValidVid, f: &str| -> String {
        root.join(vid.class())
            .join(vid.vm())
            .join(f)
            .display()
            .to_string()
    };
    for (vid, files) in &scan.vols {
        let n = vid.name();
        for cow in &files.cows {
            plan.removals.push((
                vid.clone(),
                cow.clone(),
                "a copy-on-write leftover of the Qubes file driver".into(),
            ));
        }
        let Some(cfg) = plan.configs.get(vid) else {
            if files.temps.len() + usize::from(files.import) > 0 {
                plan.report.warnings.push(format!(
                    "{vid}: not adopted, so its unfinished temporary and import files are left alone"
                ));
            }
            continue;
        };
        for t in &files.temps {
            plan.removals.push((
                vid.clone(),
                t.clone(),
                "a temporary file of an unfinished operation".into(),
            ));
        }
        if files.import {
            plan.removals.push((
                vid.clone(),
                format!("{n}-import.img"),
                "an unfinished import".into(),
            ));
        }
        if files.precache.is_some() {
            plan.removals.push((
                vid.clone(),
                format!("{n}-precache.img"),
                format!("Qubes' precache copy of {n}.img: reflinkfs makes its own, recorded in the volume's config"),
            ));
        }
        match cfg.kind() {
            VolumeKind::Origin => {
                let mut mine: Vec<(String, u32)> = Vec::new();
                if let Some(m) = files.clean {
                    mine.push((format!("{n}.img"), m.mode));
                }
                if let Some(m) = files.dirty {
                    mine.push((format!("{n}-dirty.img"), m.mode));
                }
                for (r, m) in &files.revisions {
                    mine.push((r.file_name.clone(), m.mode));
                }
                for (f, mode) in mine {
                    if mode & 0o077 != 0 {
                        plan.chmods.push((vid.clone(), f, mode));
                    }
                }
                if files.dirty.is_some() {
                    let reason = if files.clean.is_some() && cfg.revisions_to_keep > 0 {
                        format!(
                            "left by an unclean stop: committed as at a stop, and the current {n}.img is kept as revision {}",
                            cfg.next_revision
                        )
                    } else if files.clean.is_some() {
                        format!(
                            "left by an unclean stop: committed as at a stop, replacing {n}.img"
                        )
                    } else {
                        format!("committed as at a stop: it becomes {n}.img")
                    };
                    plan.report.recovery.push(FileAction {
                        path: shown(vid, &format!("{n}-dirty.img")),
                        reason,
                    });
                }
            }
            kind => {
                let why = if kind == VolumeKind::Snapshot {
                    "a snapshot volume has no image of its own between runs (a leftover of a running or crashed qube)"
                } else {
                    "a volatile volume is emptied at every start (a leftover of the previous driver)"
                };
                if files.clean.is_some() {
                    plan.removals
                        .push((vid.clone(), format!("{n}.img"), why.into()));
                }
                if files.dirty.is_some() {
                    plan.removals
                        .push((vid.clone(), format!("{n}-dirty.img"), why.into()));
                }
                if !files.revisions.is_empty() {
                    plan.report.warnings.push(format!(
                        "{vid}: its revisions are left alone; a {} volume has none, so `pool check` reports them",
                        kind.as_str()
                    ));
                }
            }
        }
    }
    for (vid, f, reason) in &plan.removals {
        plan.report.removed.push(FileAction {
            path: shown(vid, f),
            reason: reason.clone(),
        });
    }
    for (vid, f, mode) in &plan.chmods {
        plan.report.chmod.push(FileAction {
            path: shown(vid, f),
            reason: format!("mode was {:04o}; images are 0600", mode),
        });
    }
}
