//! `pool adopt`: brings an existing Qubes `file-reflink` or `file` pool
//! directory under management in place, without copying any data.
//!
//! Adopt works in two phases.
//!
//! 1. **Plan**, which only reads: the directory tree is scanned (never
//!    through a symlink), the volume configs are taken from `qubes.xml` or
//!    inferred from the file names, every config is validated, and the file
//!    actions are listed. Any error here changes nothing, and `--dry-run`
//!    stops here with the plan as its report.
//! 2. **Write**: the metadata is built in `PATH/.reflinkfs~adopt` (pool.json,
//!    one config per volume, the lock file), the leftovers of the Qubes
//!    drivers are removed, images get mode 0600, and the directory is renamed
//!    to `PATH/.reflinkfs` in one step: a crash before the rename leaves no
//!    pool (the next adopt removes the unfinished directory), a crash after
//!    it leaves a complete one. Then the pool is opened, which runs recovery
//!    (committing a leftover `-dirty.img` of an origin volume), and checked.
//!
//! Phase 1 is `scan` (the files), `qubes_xml` (what qubes.xml says) and
//! `plan` (the configs and the file actions); phase 2 is `write`; `text`
//! renders the report.

mod plan;
mod qubes_xml;
mod scan;
mod write;

use super::config::{PoolConfig, VolumeKind, FORMAT_VERSION};
use super::fsops::{Dir, Entry};
use super::lifecycle::io_ctx;
use super::pool::{open_subdir_checked, reflink_check, Pool, META_DIR, POOL_JSON};
use super::report::Problem;
use super::revision::{now_utc, Revision};
use super::vid::ValidVid;
use crate::error::{Error, Result};
use crate::sys;
use plan::Plan;
use scan::VolFiles;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where adopt builds the metadata before renaming it to `.reflinkfs`.
pub const ADOPT_DIR: &str = ".reflinkfs~adopt";

/// Options of `pool adopt`.
#[derive(Debug, Clone, Default)]
pub struct AdoptOptions {
    pub qubes_xml: Option<PathBuf>,
    pub dry_run: bool,
    pub setup_check: bool,
}

/// Where a volume's config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigFrom {
    /// A `volume` element of qubes.xml.
    QubesXml,
    /// Inferred from the file names; `guess` says by which rule.
    Inferred,
}

/// One volume adopt configures.
#[derive(Debug, Clone, Serialize)]
pub struct AdoptedVolume {
    pub vid: String,
    #[serde(rename = "type")]
    pub kind: VolumeKind,
    pub size: u64,
    pub rw: bool,
    pub revisions_to_keep: i64,
    pub source: Option<String>,
    pub next_revision: u64,
    pub from: ConfigFrom,
    /// The qube's name in qubes.xml.
    pub qube: Option<String>,
    /// For inferred volumes: the rule that gave the type.
    pub guess: Option<String>,
    /// The revisions found, oldest first, in both name forms.
    pub revisions: Vec<Revision>,
    /// Anything else worth knowing about this volume.
    pub notes: Vec<String>,
}

/// A volume found on disk (or in qubes.xml) that adopt leaves alone.
#[derive(Debug, Clone, Serialize)]
pub struct NotAdopted {
    pub vid: String,
    pub reason: String,
}

/// A file adopt removes or changes, or that recovery acts on.
#[derive(Debug, Clone, Serialize)]
pub struct FileAction {
    pub path: String,
    pub reason: String,
}

/// The qubes.xml pool whose volumes were adopted.
#[derive(Debug, Clone, Serialize)]
pub struct XmlPool {
    pub name: String,
    pub driver: Option<String>,
    pub dir_path: Option<String>,
    /// `dir_path` (it names PATH) or `images` (no pool names PATH, and this
    /// one's volumes have their images here).
    pub matched_by: String,
}

/// What adopt did, or would do with `--dry-run`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdoptReport {
    pub dry_run: bool,
    pub pool: String,
    /// `reflink` or `copy`.
    pub mode: String,
    /// What the reflink check said.
    pub setup_check: String,
    /// The qubes.xml the configs were taken from; `None`: inferred.
    pub qubes_xml: Option<String>,
    pub xml_pools: Vec<XmlPool>,
    /// The pool's default `revisions_to_keep`.
    pub revisions_to_keep: i64,
    pub volumes: Vec<AdoptedVolume>,
    pub not_adopted: Vec<NotAdopted>,
    /// Files removed (or to be removed): `-cow.img` leftovers of the `file`
    /// driver, precache copies, stale images of snapshot and volatile
    /// volumes, unfinished temporary and import files.
    pub removed: Vec<FileAction>,
    /// Files whose mode was (or would be) narrowed to 0600.
    pub chmod: Vec<FileAction>,
    /// What recovery does at the first open (done once adopted).
    pub recovery: Vec<FileAction>,
    pub warnings: Vec<String>,
    /// `pool check` of the adopted pool (empty in a dry run).
    pub problems: Vec<Problem>,
}

/// Why a name or id was refused (see [`ValidVid`]), for messages.
fn reason_of(e: Error) -> String {
    match e {
        Error::InvalidVid { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Adopts the Qubes pool directory `path` (see the module docs).
pub fn adopt(path: &Path, opts: &AdoptOptions) -> Result<AdoptReport> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let root = open_root(&path)?;
    let mut plan = Plan::default();
    plan.report.dry_run = opts.dry_run;
    plan.report.pool = path.display().to_string();

    // An earlier adopt that did not finish left its metadata directory.
    let stale_adopt = write::stale_adopt(&root, &path, opts.dry_run)?;
    if stale_adopt {
        plan.report.removed.push(FileAction {
            path: root.shown(ADOPT_DIR).display().to_string(),
            reason: "the unfinished metadata of an interrupted adopt".into(),
        });
    }

    let xml = match &opts.qubes_xml {
        Some(x) => Some(qubes_xml::read_qubes_xml(x)?),
        None => None,
    };

    let mut warnings = Vec::new();
    let scan = scan::scan(&root, &mut warnings)?;
    plan.report.warnings = warnings;
    setup_check(&root, &path, opts, &mut plan)?;
    plan_configs(&path, opts, xml.as_ref(), &scan, &mut plan)?;
    if opts.dry_run {
        return Ok(plan.report);
    }

    // Phase 2.
    if stale_adopt {
        log::warn!(
            "removing {}, left by an adopt that did not finish",
            root.shown(ADOPT_DIR).display()
        );
        write::remove_tree(&root, ADOPT_DIR).map_err(io_ctx(&root, "removing", ADOPT_DIR))?;
    }
    write::write_pool(&root, &path, &plan)?;
    log::info!(
        "adopted {} with {} volume(s)",
        path.display(),
        plan.configs.len()
    );
    let report = plan.report;
    drop(root);
    check_adopted(&path, report)
}

/// Opens the directory to adopt, refusing a symlink, a FUSE mount and a
/// directory that already is a pool.
fn open_root(path: &Path) -> Result<Dir> {
    let path = path.to_owned();
    let root = match Dir::open_path(&path) {
        Ok(d) => d,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
            return Err(Error::NotRegular {
                what: "pool directory".into(),
                path,
            })
        }
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    if sys::fs_type(root.fd()).ok().map(sys::fs_type_name) == Some("fuse") {
        return Err(Error::InvalidValue {
            property: "--pool".into(),
            reason: format!(
                "{} is on a FUSE filesystem (the mountpoint of a pool?); adopt the directory that holds the images",
                path.display()
            ),
        });
    }

    // Already a pool?
    if root
        .entry(META_DIR)
        .map_err(io_ctx(&root, "examining", META_DIR))?
        != Entry::Missing
    {
        // A symlink or file in its place is refused.
        let meta = open_subdir_checked(&root, META_DIR, "metadata directory", false)?;
        return Err(match meta.entry(POOL_JSON) {
            Ok(Entry::Missing) | Err(_) => Error::CorruptMetadata {
                path: root.shown(META_DIR),
                reason: "it exists but holds no pool.json (an interrupted pool init?); remove it to adopt".into(),
            },
            Ok(_) => Error::PoolExists { path },
        });
    }

    Ok(root)
}

/// The reflink check, which writes nothing visible.
fn setup_check(root: &Dir, path: &Path, opts: &AdoptOptions, plan: &mut Plan) -> Result<()> {
    if opts.setup_check {
        if reflink_check(root, path, false)? {
            plan.report.setup_check = "passed: FICLONE works here".into();
        } else {
            plan.named_check = true;
            plan.report.setup_check = if opts.dry_run {
                "not run: this filesystem has no O_TMPFILE, and a dry run writes no test file"
                    .into()
            } else {
                "passed: FICLONE works here".into()
            };
        }
    } else {
        plan.report.setup_check =
            "skipped (--setup-check=no): copy mode, every snapshot is a full sparse copy".into();
    }

    Ok(())
}

/// The pool's config and every volume's, from qubes.xml or inferred from
/// the file names, and what is to be done to each file.
fn plan_configs(
    path: &Path,
    opts: &AdoptOptions,
    xml: Option<&qubes_xml::QubesXml>,
    scan: &scan::Scan,
    plan: &mut Plan,
) -> Result<()> {
    let (cands, default_keep) = match xml {
        Some(xml) => {
            let xml_path = opts.qubes_xml.as_deref().expect("given");
            plan.report.qubes_xml = Some(xml_path.display().to_string());
            let pools = qubes_xml::choose_pools(xml, xml_path, path, scan, &mut plan.report)?;
            let keep = qubes_xml::default_keep(&pools, xml_path)?;
            let cands = plan::from_xml(xml, xml_path, &pools, keep, scan, &mut plan.report)?;
            (cands, keep)
        }
        None => (plan::infer(scan, 1, &mut plan.report), 1),
    };
    let pool_cfg = PoolConfig {
        format: FORMAT_VERSION,
        copy_mode: !opts.setup_check,
        revisions_to_keep: default_keep,
        read_only: false,
        created: now_utc(),
    };
    plan.report.mode = if pool_cfg.copy_mode {
        "copy"
    } else {
        "reflink"
    }
    .into();
    plan.report.revisions_to_keep = default_keep;

    let finished = plan::finish_configs(cands, &pool_cfg, scan, &mut plan.report);
    for (vid, (cfg, c)) in &finished {
        let files = scan.vols.get(vid);
        plan.report.volumes.push(AdoptedVolume {
            vid: vid.to_string(),
            kind: cfg.kind(),
            size: cfg.size,
            rw: cfg.rw,
            revisions_to_keep: cfg.revisions_to_keep,
            source: cfg.source.as_ref().map(ValidVid::to_string),
            next_revision: cfg.next_revision,
            from: c.from,
            qube: c.qube.clone(),
            guess: c.guess.clone(),
            revisions: files.map(VolFiles::revisions).unwrap_or_default(),
            notes: c.notes.clone(),
        });
    }
    plan.configs = finished.into_iter().map(|(v, (cfg, _))| (v, cfg)).collect();
    plan.pool = Some(pool_cfg);
    plan::file_actions(path, scan, plan);
    plan.report.not_adopted.sort_by(|a, b| a.vid.cmp(&b.vid));
    if plan.configs.is_empty() {
        plan.report
            .warnings
            .push("no volume was found to adopt; the pool is empty".into());
    }

    Ok(())
}

/// Opens the adopted pool (recovery runs), makes the precaches, brings the
/// report's sizes and revisions up to date and checks the pool.
fn check_adopted(path: &Path, mut report: AdoptReport) -> Result<AdoptReport> {
    // Open the adopted pool: recovery runs, then the check.
    let pool = match Pool::open(path) {
        Ok(p) => p,
        Err(Error::PoolLocked { holder, .. }) => {
            report.warnings.push(format!(
                "the adopted pool was opened by {holder} before adopt could check it; run `reflinkfs pool check`"
            ));
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    // Qubes' precache copies went with the plan: ours replace them, so
    // the first start costs what it did under file-reflink.
    let made = pool.make_missing_precaches();
    if made > 0 {
        log::info!("made the precache of {made} volume(s)");
    }
    for v in &mut report.volumes {
        let Ok(vid) = v.vid.parse::<ValidVid>() else {
            continue;
        };
        if let Ok(vol) = pool.volume(&vid) {
            let c = vol.config();
            v.size = pool.nominal_size(&c);
            v.next_revision = c.next_revision;
        }
        if let Ok(revs) = pool.revisions(&vid) {
            v.revisions = revs;
        }
    }
    report.problems = pool.check(None)?;
    Ok(report)
}
