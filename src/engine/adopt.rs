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

use super::config::{store_json, PoolConfig, VolumeConfig, VolumeKind, FORMAT_VERSION};
use super::fsops::{write_all_at, Dir, DIR_MODE, FILE_MODE};
use super::pool::{
    clone_and_compare, named_reflink_check, open_subdir_checked, reflink_error, Pool, LOCK_FILE,
    META_DIR, POOL_JSON, VOLUMES_DIR,
};
use super::report::Problem;
use super::revision::{now_utc, parse_revision_name, Parsed, Revision, RevisionId};
use super::size::{check_size, format_size};
use super::vid::{check_component, ValidVid};
use crate::error::{Error, Result};
use crate::sys;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// Where adopt builds the metadata before renaming it to `.reflinkfs`.
pub const ADOPT_DIR: &str = ".reflinkfs~adopt";

/// How long a source chain may be before it is called a loop (as in the
/// engine's own resolution).
const MAX_SOURCE_DEPTH: usize = 32;

/// The largest qubes.xml read.
const MAX_XML_BYTES: u64 = 64 << 20;

/// `FUSE_SUPER_MAGIC`: adopting a mountpoint instead of a directory is
/// refused.
const FUSE_MAGIC: i64 = 0x6573_5546;

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

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

impl AdoptReport {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let mode = if self.mode == "copy" {
            "copy mode"
        } else {
            "reflink mode"
        };
        if self.dry_run {
            let _ = writeln!(
                o,
                "dry run: adopting {} would make it a reflinkfs pool ({mode}); nothing was changed",
                self.pool
            );
        } else {
            let _ = writeln!(o, "adopted {} as a reflinkfs pool ({mode})", self.pool);
        }
        let _ = writeln!(o, "setup check: {}", self.setup_check);
        match &self.qubes_xml {
            Some(x) => {
                let pools: Vec<String> = self
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
        let _ = writeln!(o, "default revisions_to_keep: {}", self.revisions_to_keep);

        let _ = writeln!(
            o,
            "\n{} volume{}:",
            self.volumes.len(),
            plural(self.volumes.len())
        );
        for v in &self.volumes {
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
        if !self.not_adopted.is_empty() {
            let _ = writeln!(o, "\nnot adopted ({}), left alone:", self.not_adopted.len());
            for n in &self.not_adopted {
                let _ = writeln!(o, "  {}: {}", n.vid, n.reason);
            }
        }
        let sections = [
            (
                if self.dry_run {
                    "would remove"
                } else {
                    "removed"
                },
                &self.removed,
            ),
            (
                if self.dry_run {
                    "would set mode 0600 on"
                } else {
                    "set mode 0600 on"
                },
                &self.chmod,
            ),
            (
                if self.dry_run {
                    "recovery at the first open acts on"
                } else {
                    "recovery at the first open acted on"
                },
                &self.recovery,
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
        if !self.warnings.is_empty() {
            let _ = writeln!(
                o,
                "\n{} warning{}:",
                self.warnings.len(),
                plural(self.warnings.len())
            );
            for w in &self.warnings {
                let _ = writeln!(o, "  {w}");
            }
        }
        if !self.dry_run {
            if self.problems.is_empty() {
                let _ = writeln!(o, "\npool check: no problems");
            } else {
                let _ = writeln!(
                    o,
                    "\npool check: {} problem{}:",
                    self.problems.len(),
                    plural(self.problems.len())
                );
                for p in &self.problems {
                    let _ = writeln!(o, "  {}: {}", p.path, p.problem);
                }
            }
        }
        o
    }
}

// ---------------------------------------------------------------------------
// Scanning the tree.

/// What `lstat` says about a directory entry.
#[derive(Debug, Clone, Copy)]
struct Meta {
    kind: EntryKind,
    size: u64,
    mode: u32,
    dev: u64,
    ino: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Regular,
    Directory,
    Symlink,
    Other,
}

fn lstat(dir: &Dir, name: &str) -> Result<Meta> {
    let st = sys::lstatat(dir.fd(), name)
        .map_err(|e| Error::io(format!("examining {}", dir.shown(name).display()), e))?;
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::Regular,
        libc::S_IFDIR => EntryKind::Directory,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    };
    Ok(Meta {
        kind,
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// The part a file plays for the volume whose name it starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// `N.img`
    Clean,
    /// `N-dirty.img`
    Dirty,
    /// `N-precache.img` (Qubes 4.1+: a reflink copy of `N.img`).
    Precache,
    /// `N-import.img`: an unfinished import.
    Import,
    /// `N-cow.img`, `N-cow.img.old`: copy-on-write files of the `file` driver.
    Cow,
    /// `N….img…~…`: a temporary file of an unfinished operation.
    Temp,
    Revision(Revision),
    /// Looks like a revision of `N` but does not parse.
    BadRevision,
}

impl Role {
    fn describe(&self) -> &'static str {
        match self {
            Role::Clean => "image",
            Role::Dirty => "dirty image",
            Role::Precache => "precache image",
            Role::Import => "import file",
            Role::Cow => "copy-on-write file",
            Role::Temp => "temporary file",
            Role::Revision(_) | Role::BadRevision => "revision",
        }
    }
}

/// Splits a file name of a VM directory into a volume name and a role.
/// `None` for names that belong to no volume.
fn classify(file: &str) -> Option<(String, Role)> {
    if let Some((base, _)) = file.split_once('~') {
        return classify(base).map(|(n, _)| (n, Role::Temp));
    }
    for (suffix, role) in [
        ("-dirty.img", Role::Dirty),
        ("-precache.img", Role::Precache),
        ("-import.img", Role::Import),
        ("-cow.img", Role::Cow),
        ("-cow.img.old", Role::Cow),
    ] {
        if let Some(n) = file.strip_suffix(suffix) {
            if !n.is_empty() {
                return Some((n.to_owned(), role));
            }
        }
    }
    if let Some(n) = file.strip_suffix(".img") {
        if !n.is_empty() {
            return Some((n.to_owned(), Role::Clean));
        }
    }
    // `N.img.K@TS` or `N.img@TS`; the timestamp holds no '@'.
    let (pre, _) = file.rsplit_once('@')?;
    let name = match pre.strip_suffix(".img") {
        Some(n) => n,
        None => {
            let (x, k) = pre.rsplit_once('.')?;
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            x.strip_suffix(".img")?
        }
    };
    if name.is_empty() {
        return None;
    }
    match parse_revision_name(name, file) {
        Parsed::Revision(r) => Some((name.to_owned(), Role::Revision(r))),
        Parsed::Malformed => Some((name.to_owned(), Role::BadRevision)),
        Parsed::NotOurs => None,
    }
}

/// The files of one volume found on disk.
#[derive(Debug, Default, Clone)]
struct VolFiles {
    clean: Option<Meta>,
    dirty: Option<Meta>,
    precache: Option<Meta>,
    import: bool,
    cows: Vec<String>,
    temps: Vec<String>,
    revisions: Vec<(Revision, Meta)>,
}

impl VolFiles {
    fn revisions(&self) -> Vec<Revision> {
        let mut v: Vec<Revision> = self.revisions.iter().map(|(r, _)| r.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn next_revision(&self) -> u64 {
        self.revisions
            .iter()
            .filter_map(|(r, _)| match r.id {
                RevisionId::Numbered(k) => Some(k.saturating_add(1)),
                RevisionId::Legacy(_) => None,
            })
            .max()
            .unwrap_or(1)
            .max(1)
    }

    fn has_any_image(&self) -> bool {
        self.clean.is_some() || self.dirty.is_some() || !self.revisions.is_empty()
    }
}

/// Every volume found under PATH.
#[derive(Debug, Default)]
struct Scan {
    vols: BTreeMap<ValidVid, VolFiles>,
}

/// Opens a subdirectory without following a symlink; a symlink swapped in
/// since the `lstat` is refused like one seen by it.
fn open_subdir(parent: &Dir, name: &str, what: &str) -> Result<Dir> {
    open_subdir_checked(parent, name, what, false)
}

fn list(dir: &Dir) -> Result<Vec<String>> {
    let mut names = dir
        .names()
        .map_err(|e| Error::io(format!("listing {}", dir.path().display()), e))?;
    names.sort();
    Ok(names)
}

/// Walks `CLASS/VM/FILE` under the root. Symlinks are never followed: a
/// symlink in place of a VM directory or of a volume's file is refused
/// (nothing has been changed yet); one at the top level is left alone.
fn scan(root: &Dir, warnings: &mut Vec<String>) -> Result<Scan> {
    let mut out = Scan::default();
    for class in list(root)? {
        if class == META_DIR || class == ADOPT_DIR {
            continue;
        }
        let m = lstat(root, &class)?;
        let shown = root.shown(&class);
        match m.kind {
            EntryKind::Directory => {}
            EntryKind::Symlink => {
                warnings.push(format!(
                    "{}: a symlink, not followed; nothing under it is adopted",
                    shown.display()
                ));
                continue;
            }
            _ => {
                warnings.push(format!(
                    "{}: not a directory of VM images; left alone",
                    shown.display()
                ));
                continue;
            }
        }
        if let Err(e) = check_component(&class, "class", &class) {
            warnings.push(format!(
                "{}: skipped, not a valid class name ({})",
                shown.display(),
                reason_of(e)
            ));
            continue;
        }
        let cdir = open_subdir(root, &class, "class directory")?;
        for vm in list(&cdir)? {
            let m = lstat(&cdir, &vm)?;
            match m.kind {
                EntryKind::Directory => {}
                EntryKind::Symlink => {
                    return Err(Error::NotRegular {
                        what: "VM directory".into(),
                        path: cdir.shown(&vm),
                    })
                }
                _ => {
                    warnings.push(format!(
                        "{}: not a VM directory; left alone",
                        cdir.shown(&vm).display()
                    ));
                    continue;
                }
            }
            if let Err(e) = check_component(&vm, "VM name", &vm) {
                warnings.push(format!(
                    "{}: skipped, not a valid VM name ({})",
                    cdir.shown(&vm).display(),
                    reason_of(e)
                ));
                continue;
            }
            let vdir = open_subdir(&cdir, &vm, "VM directory")?;
            for file in list(&vdir)? {
                scan_file(&vdir, &class, &vm, &file, &mut out, warnings)?;
            }
        }
    }
    Ok(out)
}

fn reason_of(e: Error) -> String {
    match e {
        Error::InvalidVid { reason, .. } => reason,
        other => other.to_string(),
    }
}

fn scan_file(
    vdir: &Dir,
    class: &str,
    vm: &str,
    file: &str,
    out: &mut Scan,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let m = lstat(vdir, file)?;
    let shown = vdir.shown(file);
    let Some((name, role)) = classify(file) else {
        let what = match m.kind {
            EntryKind::Directory => "an unexpected directory",
            EntryKind::Symlink => "a symlink (not followed)",
            _ => "not a file of any volume",
        };
        warnings.push(format!("{}: {what}; left alone", shown.display()));
        return Ok(());
    };
    let vid = match ValidVid::new(class, vm, &name).and_then(|v| v.check_new().map(|()| v)) {
        Ok(v) => v,
        Err(e) => {
            warnings.push(format!(
                "{}: skipped, {name:?} is not a valid volume name ({}); left alone",
                shown.display(),
                reason_of(e)
            ));
            return Ok(());
        }
    };
    if m.kind != EntryKind::Regular {
        return Err(Error::NotRegular {
            what: format!("{} of {vid}", role.describe()),
            path: shown,
        });
    }
    let files = out.vols.entry(vid.clone()).or_default();
    match role {
        Role::Clean => files.clean = Some(m),
        Role::Dirty => files.dirty = Some(m),
        Role::Precache => files.precache = Some(m),
        Role::Import => files.import = true,
        Role::Cow => files.cows.push(file.to_owned()),
        Role::Temp => files.temps.push(file.to_owned()),
        Role::Revision(r) => files.revisions.push((r, m)),
        Role::BadRevision => warnings.push(format!(
            "{}: looks like a revision of {vid} but its name does not parse; left alone",
            shown.display()
        )),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// qubes.xml.

#[derive(Debug, Clone)]
struct XmlPoolDef {
    name: String,
    driver: Option<String>,
    dir_path: Option<String>,
    revisions_to_keep: Option<String>,
}

/// A `volume` element, attributes as written.
#[derive(Debug, Clone, Default)]
struct XmlVol {
    qube: Option<String>,
    pool: Option<String>,
    vid: Option<String>,
    size: Option<String>,
    rw: Option<String>,
    save_on_stop: Option<String>,
    snap_on_start: Option<String>,
    source: Option<String>,
    revisions_to_keep: Option<String>,
}

#[derive(Debug, Default)]
struct QubesXml {
    pools: Vec<XmlPoolDef>,
    volumes: Vec<XmlVol>,
}

fn xml_error(xml: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptMetadata {
        path: xml.to_owned(),
        reason: reason.into(),
    }
}

fn read_qubes_xml(xml: &Path) -> Result<QubesXml> {
    use std::io::Read;
    let f = File::open(xml).map_err(|e| Error::io(format!("opening {}", xml.display()), e))?;
    let mut bytes = Vec::new();
    f.take(MAX_XML_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {}", xml.display()), e))?;
    if bytes.len() as u64 > MAX_XML_BYTES {
        return Err(xml_error(
            xml,
            format!("larger than {} bytes; not a qubes.xml", MAX_XML_BYTES),
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| xml_error(xml, "not valid XML: the file is not UTF-8"))?;
    parse_qubes_xml(&text, xml)
}

fn child_elements<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    tag: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'input>> + 'a {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == tag)
}

fn parse_qubes_xml(text: &str, xml: &Path) -> Result<QubesXml> {
    let doc = roxmltree::Document::parse(text)
        .map_err(|e| xml_error(xml, format!("not valid XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "qubes" {
        return Err(xml_error(
            xml,
            format!(
                "not a qubes.xml: the root element is <{}>, not <qubes>",
                root.tag_name().name()
            ),
        ));
    }
    let attr = |n: roxmltree::Node, a: &str| n.attribute(a).map(str::to_owned);
    let mut out = QubesXml::default();
    for pools in child_elements(root, "pools") {
        for p in child_elements(pools, "pool") {
            let Some(name) = attr(p, "name") else {
                return Err(xml_error(xml, "a <pool> element has no name attribute"));
            };
            out.pools.push(XmlPoolDef {
                name,
                driver: attr(p, "driver"),
                dir_path: attr(p, "dir_path").or_else(|| attr(p, "dir")),
                revisions_to_keep: attr(p, "revisions_to_keep"),
            });
        }
    }
    for domains in child_elements(root, "domains") {
        for d in child_elements(domains, "domain") {
            let qube = child_elements(d, "properties")
                .flat_map(|ps| child_elements(ps, "property"))
                .find(|p| p.attribute("name") == Some("name"))
                .and_then(|p| p.text())
                .map(|t| t.trim().to_owned());
            for vc in child_elements(d, "volume-config") {
                for v in child_elements(vc, "volume") {
                    out.volumes.push(XmlVol {
                        qube: qube.clone(),
                        pool: attr(v, "pool"),
                        vid: attr(v, "vid"),
                        size: attr(v, "size"),
                        rw: attr(v, "rw"),
                        save_on_stop: attr(v, "save_on_stop"),
                        snap_on_start: attr(v, "snap_on_start"),
                        source: attr(v, "source"),
                        revisions_to_keep: attr(v, "revisions_to_keep"),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// A Qubes boolean as written in qubes.xml (`True`/`False`; the other
/// spellings `qubes.property.bool` accepts too).
fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" | "" => Some(false),
        _ => None,
    }
}

/// Compares a `dir_path` of qubes.xml with PATH.
fn same_dir(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| -> PathBuf {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_owned())
            .components()
            .collect()
    };
    if norm(a) == norm(b) {
        return true;
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// The plan.

/// A volume config before the cross-volume checks.
#[derive(Debug, Clone)]
struct Candidate {
    kind: VolumeKind,
    /// `None` for a snapshot whose size follows its source.
    size: Option<u64>,
    rw: bool,
    revisions_to_keep: i64,
    source: Option<ValidVid>,
    from: ConfigFrom,
    qube: Option<String>,
    guess: Option<String>,
    notes: Vec<String>,
}

#[derive(Debug, Default)]
struct Plan {
    pool: Option<PoolConfig>,
    configs: BTreeMap<ValidVid, VolumeConfig>,
    report: AdoptReport,
    /// (vid, file, reason) of the files to remove.
    removals: Vec<(ValidVid, String, String)>,
    /// (vid, file, old mode) of the files to chmod 0600.
    chmods: Vec<(ValidVid, String, u32)>,
    /// A named-file reflink check is needed (no O_TMPFILE here).
    named_check: bool,
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

/// Configs inferred from the file names (no qubes.xml).
fn infer(
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
        let base = |kind: VolumeKind, size: Option<u64>, keep: i64, guess: String| Candidate {
            kind,
            size,
            rw: true,
            revisions_to_keep: keep,
            source: None,
            from: ConfigFrom::Inferred,
            qube: None,
            guess: Some(guess),
            notes: Vec::new(),
        };
        if vid.name() == "volatile" {
            let Some(m) = files.dirty.or(files.clean) else {
                not_adopted(
                    report,
                    vid,
                    "a volatile volume with no image to take its size from; give --qubes-xml",
                );
                continue;
            };
            if m.size == 0 || m.size % 512 != 0 {
                not_adopted(
                    report,
                    vid,
                    format!(
                        "its image is {} bytes, not a positive multiple of 512",
                        m.size
                    ),
                );
                continue;
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
            out.insert(vid.clone(), c);
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

/// The pools of qubes.xml whose volumes are adopted.
fn choose_pools(
    xml: &QubesXml,
    xml_path: &Path,
    root: &Path,
    scan: &Scan,
    report: &mut AdoptReport,
) -> Result<Vec<XmlPoolDef>> {
    let adoptable = |p: &XmlPoolDef| {
        p.driver
            .as_deref()
            .is_none_or(|d| d == "file-reflink" || d == "file")
    };
    let by_path: Vec<&XmlPoolDef> = xml
        .pools
        .iter()
        .filter(|p| {
            p.dir_path
                .as_deref()
                .is_some_and(|d| same_dir(Path::new(d), root))
        })
        .collect();
    if !by_path.is_empty() {
        if let Some(p) = by_path.iter().find(|p| !adoptable(p)) {
            return Err(Error::InvalidValue {
                property: "qubes.xml".into(),
                reason: format!(
                    "pool {} at {} uses the {} driver; only file-reflink and file pools can be adopted",
                    p.name,
                    root.display(),
                    p.driver.as_deref().unwrap_or("?")
                ),
            });
        }
        for p in &by_path {
            report.xml_pools.push(XmlPool {
                name: p.name.clone(),
                driver: p.driver.clone(),
                dir_path: p.dir_path.clone(),
                matched_by: "dir_path".into(),
            });
        }
        return Ok(by_path.into_iter().cloned().collect());
    }
    // No pool names this directory (a copy, or disks moved): take the pool
    // whose volumes have their files here.
    let mut found: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &xml.volumes {
        let (Some(pool), Some(vid)) = (&v.pool, &v.vid) else {
            continue;
        };
        if let Ok(vid) = vid.parse::<ValidVid>() {
            if scan.vols.get(&vid).is_some_and(VolFiles::has_any_image) {
                *found.entry(pool.as_str()).or_default() += 1;
            }
        }
    }
    found.retain(|name, _| xml.pools.iter().all(|p| p.name != *name || adoptable(p)));
    match found.len() {
        0 => Err(Error::InvalidValue {
            property: "qubes.xml".into(),
            reason: format!(
                "{} names no file-reflink or file pool at {}, and none of its volumes has an image there",
                xml_path.display(),
                root.display()
            ),
        }),
        1 => {
            let (name, n) = found.into_iter().next().expect("one");
            let def = xml.pools.iter().find(|p| p.name == name).cloned();
            let def = def.unwrap_or(XmlPoolDef {
                name: name.to_owned(),
                driver: None,
                dir_path: None,
                revisions_to_keep: None,
            });
            report.warnings.push(format!(
                "no pool in qubes.xml has dir_path {}; using pool {} ({n} of its volumes have images here{})",
                root.display(),
                def.name,
                def.dir_path
                    .as_deref()
                    .map(|d| format!("; its dir_path is {d}"))
                    .unwrap_or_default()
            ));
            report.xml_pools.push(XmlPool {
                name: def.name.clone(),
                driver: def.driver.clone(),
                dir_path: def.dir_path.clone(),
                matched_by: "images".into(),
            });
            Ok(vec![def])
        }
        _ => Err(Error::InvalidValue {
            property: "qubes.xml".into(),
            reason: format!(
                "no pool in it names {}, and the images here belong to volumes of several pools ({}); adopt needs one",
                root.display(),
                found.keys().copied().collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// Configs from the `volume` elements of the chosen pools.
fn from_xml(
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
        let who = || {
            format!(
                "the volume {} of qube {}",
                v.vid.as_deref().unwrap_or("?"),
                qube.as_deref().unwrap_or("?")
            )
        };
        let Some(raw_vid) = &v.vid else {
            report
                .warnings
                .push(format!("{} in pool {pool} has no vid; skipped", who()));
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
        let flag = |name: &str, value: &Option<String>, default: bool| -> Result<bool> {
            match value {
                None => Ok(default),
                Some(s) => parse_bool(s).ok_or_else(|| {
                    xml_error(
                        xml_path,
                        format!("{}: {name}={s:?} is not True or False", who()),
                    )
                }),
            }
        };
        // Missing flags take the defaults of Qubes' Volume class.
        let rw = flag("rw", &v.rw, false)?;
        let save_on_stop = flag("save_on_stop", &v.save_on_stop, false)?;
        let snap_on_start = flag("snap_on_start", &v.snap_on_start, false)?;
        let size = match &v.size {
            None => None,
            Some(s) => Some(s.trim().parse::<u64>().map_err(|_| {
                xml_error(
                    xml_path,
                    format!("{}: size={s:?} is not a number of bytes", who()),
                )
            })?),
        };
        let keep = match &v.revisions_to_keep {
            None => None,
            Some(s) => {
                let n = s.trim().parse::<i64>().map_err(|_| {
                    xml_error(
                        xml_path,
                        format!("{}: revisions_to_keep={s:?} is not an integer", who()),
                    )
                })?;
                if n < -1 {
                    return Err(xml_error(
                        xml_path,
                        format!("{}: revisions_to_keep={n} is below -1", who()),
                    ));
                }
                Some(n)
            }
        };
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
        let (size, keep, source) = match kind {
            VolumeKind::Origin => {
                let (actual, from_dirty) = match origin_size(&vid, files) {
                    Ok(s) => s,
                    Err(reason) => {
                        not_adopted(report, &vid, reason);
                        continue;
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
                (Some(actual), keep, None)
            }
            VolumeKind::Snapshot => {
                let Some(src) = &v.source else {
                    not_adopted(
                        report,
                        &vid,
                        "snap_on_start=True but qubes.xml gives no source",
                    );
                    continue;
                };
                let src = match src.parse::<ValidVid>() {
                    Ok(s) => s,
                    Err(e) => {
                        not_adopted(
                            report,
                            &vid,
                            format!(
                                "its source {src:?} is not a valid volume id: {}",
                                reason_of(e)
                            ),
                        );
                        continue;
                    }
                };
                if keep.is_some_and(|k| k != 0) {
                    notes.push(format!(
                        "qubes.xml says revisions_to_keep={}; a snapshot volume keeps none",
                        keep.unwrap_or(0)
                    ));
                }
                let size = size.filter(|s| check_size(*s, &s.to_string()).is_ok());
                (size, 0, Some(src))
            }
            VolumeKind::Volatile => {
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
                            not_adopted(
                                report,
                                &vid,
                                "a volatile volume without a valid size in qubes.xml",
                            );
                            continue;
                        }
                    },
                };
                if keep.is_some_and(|k| k != 0) {
                    notes.push(format!(
                        "qubes.xml says revisions_to_keep={}; a volatile volume keeps none",
                        keep.unwrap_or(0)
                    ));
                }
                (Some(size), 0, None)
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
    // Files of volumes qubes.xml does not list in this pool.
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
    Ok(out)
}

/// Follows a snapshot's source chain among the candidates, down to an
/// origin (like [`Pool::resolve_source`], before there is a pool).
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
fn finish_configs(
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
            let (snap_on_start, save_on_stop) = c.kind.flags();
            let next_revision = scan.vols.get(vid).map(VolFiles::next_revision).unwrap_or(1);
            let cfg = VolumeConfig {
                format: FORMAT_VERSION,
                vid: vid.clone(),
                snap_on_start,
                save_on_stop,
                size,
                rw: c.rw,
                revisions_to_keep: c.revisions_to_keep,
                source: c.source.clone(),
                optional: false,
                next_revision,
                generation: 0,
                kept_by_revert: None,
                dirty_size: None,
                incarnation: crate::sys::random_u64(),
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
fn file_actions(root: &Path, scan: &Scan, plan: &mut Plan) {
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
                format!("Qubes' precache copy of {n}.img, which reflinkfs does not use"),
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

// ---------------------------------------------------------------------------
// The reflink check.

/// The reflink check (SPEC §1.2) on two unnamed O_TMPFILE files in the
/// pool directory, so it changes nothing, in a dry run too. `Ok(false)`
/// when the filesystem has no O_TMPFILE: the real run then checks with
/// named files.
fn tmpfile_reflink_check(root: &Dir, path: &Path) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_TMPFILE)
            .open(p)
    };
    // The directory open as `root`, exactly, through /proc.
    let exact = PathBuf::from(format!("/proc/self/fd/{}", root.fd().as_raw_fd()));
    let open_here = || match open(&exact) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => open(path),
        other => other,
    };
    let unsupported = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
        )
    };
    let src = match open_here() {
        Ok(f) => f,
        Err(e) if unsupported(&e) => return Ok(false),
        Err(e) => return Err(Error::io(format!("reflink check in {}", path.display()), e)),
    };
    let dst =
        open_here().map_err(|e| Error::io(format!("reflink check in {}", path.display()), e))?;
    clone_and_compare(&src, &dst).map_err(|e| reflink_error(path, e))?;
    Ok(true)
}

// ---------------------------------------------------------------------------
// Writing.

/// Removes a directory tree that adopt made, never following a symlink.
fn remove_tree(parent: &Dir, name: &str) -> io::Result<()> {
    let dir = parent.subdir(name, false)?;
    for entry in dir.names()? {
        let st = sys::lstatat(dir.fd(), &entry)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            remove_tree(&dir, &entry)?;
        } else {
            sys::unlinkat(dir.fd(), &entry)?;
        }
    }
    drop(dir);
    sys::rmdirat(parent.fd(), name)?;
    parent.sync()
}

/// Takes the flock of an adopt in progress; `false` when another process
/// holds it.
fn lock_adopt_dir(dir: &Dir) -> Result<(File, bool)> {
    let shown = dir.shown(LOCK_FILE);
    let fd = sys::openat(dir.fd(), LOCK_FILE, libc::O_RDWR | libc::O_CREAT, FILE_MODE)
        .map_err(|e| Error::io(format!("opening {}", shown.display()), e))?;
    let file = File::from(fd);
    let locked = sys::try_lock_exclusive(file.as_fd())
        .map_err(|e| Error::io(format!("locking {}", shown.display()), e))?;
    Ok((file, locked))
}

/// The error for a directory another adopt is working on, naming its PID
/// when its lock file has it.
fn adopt_running(path: &Path, root: &Dir) -> Error {
    let pid = root
        .subdir(ADOPT_DIR, false)
        .and_then(|d| super::fsops::read_small_file(&d, LOCK_FILE))
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    Error::PoolLocked {
        pool: path.to_owned(),
        holder: if pid.is_empty() {
            "another adopt".to_owned()
        } else {
            format!("another adopt (process {pid})")
        },
        lock: root.shown(ADOPT_DIR).join(LOCK_FILE),
    }
}

/// Phase 2: builds the metadata in [`ADOPT_DIR`], acts on the files, and
/// renames the metadata into place.
fn write_pool(root: &Dir, path: &Path, plan: &Plan) -> Result<()> {
    let pool_cfg = plan.pool.as_ref().expect("planned");
    let shown_tmp = root.shown(ADOPT_DIR);
    match sys::mkdirat(root.fd(), ADOPT_DIR, DIR_MODE) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Err(adopt_running(path, root)),
        Err(e) => return Err(Error::io(format!("creating {}", shown_tmp.display()), e)),
    }
    let result = (|| -> Result<()> {
        let meta = open_subdir(root, ADOPT_DIR, "metadata directory")?;
        let (lock, locked) = lock_adopt_dir(&meta)?;
        if !locked {
            return Err(adopt_running(path, root));
        }
        let pid = format!("{}\n", std::process::id());
        let _ = write_all_at(&lock, pid.as_bytes(), 0);
        if plan.named_check {
            named_reflink_check(&meta, path)?;
        }
        store_json(meta.fd(), POOL_JSON, pool_cfg, &meta.shown(POOL_JSON))?;
        let vols = meta
            .subdir(VOLUMES_DIR, true)
            .map_err(|e| Error::io(format!("creating {}", meta.shown(VOLUMES_DIR).display()), e))?;
        for (vid, cfg) in &plan.configs {
            let io_err = |d: &Dir, n: &str| {
                let p = d.shown(n);
                move |e: io::Error| Error::io(format!("creating {}", p.display()), e)
            };
            let cdir = vols
                .subdir(vid.class(), true)
                .map_err(io_err(&vols, vid.class()))?;
            let vdir = cdir
                .subdir(vid.vm(), true)
                .map_err(io_err(&cdir, vid.vm()))?;
            let file = format!("{}.json", vid.name());
            store_json(vdir.fd(), &file, cfg, &vdir.shown(&file))?;
        }
        meta.sync()
            .map_err(|e| Error::io(format!("syncing {}", meta.path().display()), e))?;

        // The files of the Qubes drivers.
        let mut dirs: BTreeMap<(String, String), Dir> = BTreeMap::new();
        let mut vm_dir = |vid: &ValidVid| -> Result<()> {
            let key = (vid.class().to_owned(), vid.vm().to_owned());
            if let std::collections::btree_map::Entry::Vacant(slot) = dirs.entry(key) {
                let c = open_subdir(root, vid.class(), "class directory")?;
                slot.insert(open_subdir(&c, vid.vm(), "VM directory")?);
            }
            Ok(())
        };
        for (vid, _, _) in &plan.removals {
            vm_dir(vid)?;
        }
        for (vid, _, _) in &plan.chmods {
            vm_dir(vid)?;
        }
        let key = |vid: &ValidVid| (vid.class().to_owned(), vid.vm().to_owned());
        for (vid, f, _) in &plan.removals {
            let d = &dirs[&key(vid)];
            d.remove_if_exists(&vid.to_string(), f)
                .map_err(|e| Error::io(format!("removing {}", d.shown(f).display()), e))?;
        }
        for (vid, f, old) in &plan.chmods {
            let d = &dirs[&key(vid)];
            let file = d
                .open(f, libc::O_RDONLY)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) | Some(libc::EINVAL) => Error::NotRegular {
                        what: format!("file of {vid}"),
                        path: d.shown(f),
                    },
                    _ => Error::io(format!("opening {}", d.shown(f).display()), e),
                })?;
            sys::fchmod(file.as_fd(), FILE_MODE).map_err(|e| {
                Error::io(format!("changing the mode of {}", d.shown(f).display()), e)
            })?;
            log::info!(
                "{vid}: mode of {} changed from {old:04o} to 0600",
                d.shown(f).display()
            );
        }
        for d in dirs.values() {
            d.sync()
                .map_err(|e| Error::io(format!("syncing {}", d.path().display()), e))?;
        }

        // The commit: one rename makes the directory a pool.
        match lstat(root, META_DIR) {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
            Ok(_) => {
                return Err(Error::PoolExists {
                    path: path.to_owned(),
                })
            }
        }
        sys::renameat(root.fd(), ADOPT_DIR, META_DIR).map_err(|e| {
            Error::io(
                format!(
                    "renaming {} to {}",
                    shown_tmp.display(),
                    root.shown(META_DIR).display()
                ),
                e,
            )
        })?;
        root.sync()
            .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
        drop(lock);
        Ok(())
    })();
    if result.is_err() {
        match remove_tree(root, ADOPT_DIR) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => log::error!(
                "could not remove the unfinished {}: {e}; the next adopt removes it",
                shown_tmp.display()
            ),
        }
    }
    result
}

// ---------------------------------------------------------------------------

/// Adopts the Qubes pool directory `path` (see the module docs).
pub fn adopt(path: &Path, opts: &AdoptOptions) -> Result<AdoptReport> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
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
    if sys::fs_type(root.fd()).ok() == Some(FUSE_MAGIC) {
        return Err(Error::InvalidValue {
            property: "--pool".into(),
            reason: format!(
                "{} is on a FUSE filesystem (the mountpoint of a pool?); adopt the directory that holds the images",
                path.display()
            ),
        });
    }

    // Already a pool?
    match lstat(&root, META_DIR) {
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
        Ok(m) if m.kind == EntryKind::Directory => {
            let meta = open_subdir(&root, META_DIR, "metadata directory")?;
            return Err(match lstat(&meta, POOL_JSON) {
                Ok(_) => Error::PoolExists { path },
                Err(_) => Error::CorruptMetadata {
                    path: root.shown(META_DIR),
                    reason: "it exists but holds no pool.json (an interrupted pool init?); remove it to adopt".into(),
                },
            });
        }
        Ok(_) => {
            return Err(Error::NotRegular {
                what: "metadata directory".into(),
                path: root.shown(META_DIR),
            })
        }
    }

    let mut plan = Plan::default();
    plan.report.dry_run = opts.dry_run;
    plan.report.pool = path.display().to_string();

    // An earlier adopt that did not finish left its metadata directory.
    let mut stale_adopt = false;
    match lstat(&root, ADOPT_DIR) {
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
        Ok(m) if m.kind == EntryKind::Directory => {
            let d = open_subdir(&root, ADOPT_DIR, "metadata directory")?;
            let running = match lstat(&d, LOCK_FILE) {
                Ok(_) if !opts.dry_run => {
                    let (_f, locked) = lock_adopt_dir(&d)?;
                    !locked
                }
                Ok(_) => {
                    // A dry run must not create or lock anything: open the
                    // existing lock file read-only to test it.
                    let f = d.open(LOCK_FILE, libc::O_RDONLY).map_err(|e| {
                        Error::io(format!("opening {}", d.shown(LOCK_FILE).display()), e)
                    })?;
                    !sys::try_lock_exclusive(f.as_fd()).map_err(|e| {
                        Error::io(format!("locking {}", d.shown(LOCK_FILE).display()), e)
                    })?
                }
                Err(_) => false,
            };
            if running {
                return Err(adopt_running(&path, &root));
            }
            stale_adopt = true;
            plan.report.removed.push(FileAction {
                path: root.shown(ADOPT_DIR).display().to_string(),
                reason: "the unfinished metadata of an interrupted adopt".into(),
            });
        }
        Ok(_) => {
            return Err(Error::NotRegular {
                what: "unfinished adopt directory".into(),
                path: root.shown(ADOPT_DIR),
            })
        }
    }

    let xml = match &opts.qubes_xml {
        Some(x) => Some(read_qubes_xml(x)?),
        None => None,
    };

    let mut warnings = Vec::new();
    let scan = scan(&root, &mut warnings)?;
    plan.report.warnings = warnings;

    // The reflink check, which writes nothing visible.
    if opts.setup_check {
        if tmpfile_reflink_check(&root, &path)? {
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

    let (cands, default_keep) = match &xml {
        Some(xml) => {
            let xml_path = opts.qubes_xml.as_deref().expect("given");
            plan.report.qubes_xml = Some(xml_path.display().to_string());
            let pools = choose_pools(xml, xml_path, &path, &scan, &mut plan.report)?;
            let mut keep = 1;
            for p in &pools {
                if let Some(s) = &p.revisions_to_keep {
                    match s.trim().parse::<i64>() {
                        Ok(n) if n >= -1 => keep = n,
                        _ => {
                            return Err(xml_error(
                                xml_path,
                                format!(
                                "pool {}: revisions_to_keep={s:?} is not an integer of at least -1",
                                p.name
                            ),
                            ))
                        }
                    }
                }
            }
            let cands = from_xml(xml, xml_path, &pools, keep, &scan, &mut plan.report)?;
            (cands, keep)
        }
        None => (infer(&scan, 1, &mut plan.report), 1),
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

    let finished = finish_configs(cands, &pool_cfg, &scan, &mut plan.report);
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
    file_actions(&path, &scan, &mut plan);
    plan.report.not_adopted.sort_by(|a, b| a.vid.cmp(&b.vid));
    if plan.configs.is_empty() {
        plan.report
            .warnings
            .push("no volume was found to adopt; the pool is empty".into());
    }

    if opts.dry_run {
        return Ok(plan.report);
    }

    // Phase 2.
    if stale_adopt {
        log::warn!(
            "removing {}, left by an adopt that did not finish",
            root.shown(ADOPT_DIR).display()
        );
        remove_tree(&root, ADOPT_DIR)
            .map_err(|e| Error::io(format!("removing {}", root.shown(ADOPT_DIR).display()), e))?;
    }
    write_pool(&root, &path, &plan)?;
    log::info!(
        "adopted {} with {} volume(s)",
        path.display(),
        plan.configs.len()
    );
    let mut report = plan.report;
    drop(root);

    // Open the adopted pool: recovery runs, then the check.
    let pool = match Pool::open(&path) {
        Ok(p) => p,
        Err(Error::PoolLocked { holder, .. }) => {
            report.warnings.push(format!(
                "the adopted pool was opened by {holder} before adopt could check it; run `reflinkfs pool check`"
            ));
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names() {
        let c = |f: &str| classify(f);
        assert_eq!(c("private.img"), Some(("private".into(), Role::Clean)));
        assert_eq!(
            c("private-dirty.img"),
            Some(("private".into(), Role::Dirty))
        );
        assert_eq!(c("root-cow.img"), Some(("root".into(), Role::Cow)));
        assert_eq!(c("root-cow.img.old"), Some(("root".into(), Role::Cow)));
        assert_eq!(
            c("private-precache.img"),
            Some(("private".into(), Role::Precache))
        );
        assert_eq!(c("private.img~x1y2"), Some(("private".into(), Role::Temp)));
        assert_eq!(
            c("private-dirty.img~tmp"),
            Some(("private".into(), Role::Temp))
        );
        assert!(matches!(
            c("private.img.3@2024-01-01T00:00:00Z"),
            Some((n, Role::Revision(r))) if n == "private" && r.id == RevisionId::Numbered(3)
        ));
        assert!(matches!(
            c("private.img@2023-12-01T00:00:00Z"),
            Some((n, Role::Revision(r))) if n == "private" && matches!(r.id, RevisionId::Legacy(_))
        ));
        assert!(matches!(
            c("a.img.b.img.7@2024-01-01T00:00:00Z"),
            Some((n, Role::Revision(_))) if n == "a.img.b"
        ));
        assert_eq!(
            c("private.img@yesterday"),
            Some(("private".into(), Role::BadRevision))
        );
        assert_eq!(c("firewall.xml"), None);
        assert_eq!(c("icon.png"), None);
        assert_eq!(c(".img"), None);
        assert_eq!(c("x@y"), None);
    }

    #[test]
    fn parses_qubes_xml() {
        let text = r#"<?xml version='1.0' encoding='UTF-8'?>
<qubes version="3.0">
  <pools>
    <pool dir_path="/var/lib/qubes" driver="file-reflink" name="varlibqubes" revisions_to_keep="2"/>
    <pool dir_path="/var/lib/qubes/vm-kernels" driver="linux-kernel" name="linux-kernel"/>
  </pools>
  <domains>
    <domain class="TemplateVM" id="domain-1">
      <properties><property name="name">fedora</property></properties>
      <volume-config>
        <volume name="root" pool="varlibqubes" vid="vm-templates/fedora/root" size="1048576" rw="True" save_on_stop="True" snap_on_start="False" revisions_to_keep="1"/>
        <volume name="kernel" pool="linux-kernel" vid="6.1" rw="False"/>
      </volume-config>
    </domain>
  </domains>
</qubes>"#;
        let x = parse_qubes_xml(text, Path::new("q.xml")).unwrap();
        assert_eq!(x.pools.len(), 2);
        assert_eq!(x.pools[0].dir_path.as_deref(), Some("/var/lib/qubes"));
        assert_eq!(x.volumes.len(), 2);
        assert_eq!(x.volumes[0].qube.as_deref(), Some("fedora"));
        assert_eq!(
            x.volumes[0].vid.as_deref(),
            Some("vm-templates/fedora/root")
        );
        assert!(parse_qubes_xml("not xml", Path::new("q.xml")).is_err());
        assert!(parse_qubes_xml("<other/>", Path::new("q.xml")).is_err());
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("False"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
