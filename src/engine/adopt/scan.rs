//! Phase 1, the files: the tree `CLASS/VM/FILE` under the pool directory,
//! each file's name split into a volume and the part it plays for it.

use super::{reason_of, ADOPT_DIR};
use crate::engine::fsops::{Dir, FileSig};
use crate::engine::lifecycle::io_ctx;
use crate::engine::pool::{open_subdir_checked, META_DIR};
use crate::engine::revision::{parse_revision_name, Parsed, Revision, RevisionId};
use crate::engine::vid::{check_component, ValidVid};
use crate::error::{Error, Result};
use crate::sys;
use std::collections::BTreeMap;

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
pub(super) struct VolFiles {
    pub(super) clean: Option<FileSig>,
    pub(super) dirty: Option<FileSig>,
    pub(super) precache: Option<FileSig>,
    pub(super) import: bool,
    pub(super) cows: Vec<String>,
    pub(super) temps: Vec<String>,
    pub(super) revisions: Vec<(Revision, FileSig)>,
}

impl VolFiles {
    pub(super) fn revisions(&self) -> Vec<Revision> {
        let mut v: Vec<Revision> = self.revisions.iter().map(|(r, _)| r.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub(super) fn next_revision(&self) -> u64 {
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

    pub(super) fn has_any_image(&self) -> bool {
        self.clean.is_some() || self.dirty.is_some() || !self.revisions.is_empty()
    }
}

/// Every volume found under PATH.
#[derive(Debug, Default)]
pub(super) struct Scan {
    pub(super) vols: BTreeMap<ValidVid, VolFiles>,
}

fn list(dir: &Dir) -> Result<Vec<String>> {
    let mut names = dir
        .names()
        .map_err(|e| Error::io(format!("listing {}", dir.path().display()), e))?;
    names.sort();
    Ok(names)
}

/// The file type (`S_IFMT` bits) and the signature of a directory entry,
/// by `lstat`: never through a symlink.
fn examine(dir: &Dir, name: &str) -> Result<(libc::mode_t, FileSig)> {
    let st = sys::lstatat(dir.fd(), name).map_err(io_ctx(dir, "examining", name))?;
    Ok((st.st_mode & libc::S_IFMT, FileSig::from_stat(&st)))
}

/// Walks `CLASS/VM/FILE` under the root. Symlinks are never followed: a
/// symlink in place of a VM directory or of a volume's file is refused
/// (nothing has been changed yet); one at the top level is left alone.
/// A symlink swapped in since the `lstat` is refused like one seen by it
/// (see [`open_subdir_checked`]).
pub(super) fn scan(root: &Dir, warnings: &mut Vec<String>) -> Result<Scan> {
    let mut out = Scan::default();
    for class in list(root)? {
        if class == META_DIR || class == ADOPT_DIR {
            continue;
        }
        let (kind, _) = examine(root, &class)?;
        let shown = root.shown(&class);
        match kind {
            libc::S_IFDIR => {}
            libc::S_IFLNK => {
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
        let cdir = open_subdir_checked(root, &class, "class directory", false)?;
        for vm in list(&cdir)? {
            let (kind, _) = examine(&cdir, &vm)?;
            match kind {
                libc::S_IFDIR => {}
                libc::S_IFLNK => {
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
            let vdir = open_subdir_checked(&cdir, &vm, "VM directory", false)?;
            for file in list(&vdir)? {
                scan_file(&vdir, &class, &vm, &file, &mut out, warnings)?;
            }
        }
    }
    Ok(out)
}

fn scan_file(
    vdir: &Dir,
    class: &str,
    vm: &str,
    file: &str,
    out: &mut Scan,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let (kind, m) = examine(vdir, file)?;
    let shown = vdir.shown(file);
    let Some((name, role)) = classify(file) else {
        let what = match kind {
            libc::S_IFDIR => "an unexpected directory",
            libc::S_IFLNK => "a symlink (not followed)",
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
    if kind != libc::S_IFREG {
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
}
