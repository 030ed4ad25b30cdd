//! `pool check` (SPEC §5): the consistency check of a pool or of one
//! volume, every problem found with its file.

use super::config::{VolumeConfig, VolumeKind};
use super::fsops::{Dir, Entry, FileSig};
use super::pool::{Names, Pool};
use super::report::Problem;
use super::revision::{parse_revision_name, Parsed};
use super::vid::ValidVid;
use super::volume::{LifeState, Snapshot};
use crate::error::{Error, Result};
use crate::sys;

impl Pool {
    /// The consistency check of the whole pool (`vid: None`) or of one
    /// volume: every problem found, each with its file.
    pub fn check(&self, only: Option<&ValidVid>) -> Result<Vec<Problem>> {
        let mut problems = Vec::new();
        let mut push = |vid: Option<&ValidVid>, path: String, problem: String| {
            problems.push(Problem {
                vid: vid.map(|v| v.to_string()),
                path,
                problem,
            })
        };
        if let Some(vid) = only {
            self.volume(vid)?;
        }
        for (vid, (path, reason)) in self.table.corrupt.read().iter() {
            if only.is_none_or(|o| o == vid) {
                push(
                    Some(vid),
                    path.display().to_string(),
                    format!("corrupt metadata: {reason}"),
                );
            }
        }
        // Volumes by VM directory, to find files no volume owns.
        let mut vms: std::collections::BTreeMap<(String, String), Vec<ValidVid>> =
            Default::default();
        for vid in self.vids() {
            vms.entry((vid.class().to_owned(), vid.vm().to_owned()))
                .or_default()
                .push(vid);
        }
        for ((class, vm), vids) in &vms {
            let Some(first) = vids.first() else { continue };
            if only.is_some_and(|o| !vids.contains(o)) {
                continue;
            }
            let dir = match self.vm_dir_if_exists(first) {
                Ok(Some(d)) => d,
                Ok(None) => {
                    for vid in vids {
                        if let Ok(vol) = self.volume(vid) {
                            let c = vol.config();
                            if c.kind() == VolumeKind::Origin && !c.optional {
                                push(
                                    Some(vid),
                                    self.path().join(class).join(vm).display().to_string(),
                                    "the VM directory is missing".into(),
                                );
                            }
                        }
                    }
                    continue;
                }
                Err(e) => {
                    push(
                        Some(first),
                        self.path().join(class).join(vm).display().to_string(),
                        e.to_string(),
                    );
                    continue;
                }
            };
            let names = dir
                .names()
                .map_err(|e| Error::io(format!("listing {}", dir.path().display()), e))?;
            for name in &names {
                let owners: Vec<&ValidVid> =
                    vids.iter().filter(|v| Names::of(v).owns(name)).collect();
                // Only image-like names: Qubes keeps other files (such as
                // firewall.xml) in VM directories, and they are no problem.
                // A name that looks like a revision of a volume but does
                // not parse is reported once, as that volume's problem.
                let malformed = vids
                    .iter()
                    .any(|v| matches!(parse_revision_name(v.name(), name), Parsed::Malformed));
                if owners.is_empty() && !malformed && only.is_none() && name.contains(".img") {
                    push(
                        None,
                        dir.shown(name).display().to_string(),
                        "no volume owns this file".into(),
                    );
                }
            }
            for vid in vids {
                if only.is_some_and(|o| o != vid) {
                    continue;
                }
                let Ok(vol) = self.volume(vid) else { continue };
                let snap = vol.snapshot();
                if !matches!(
                    snap.state,
                    LifeState::Running | LifeState::Stopped | LifeState::Held
                ) {
                    // A start, commit or operation in progress has files
                    // in flight: they are no problem.
                    continue;
                }
                // A sibling's files are no problem of this volume's, however
                // much their names look like its revisions.
                let mine: Vec<String> = names
                    .iter()
                    .filter(|f| !vids.iter().any(|o| o != vid && Names::of(o).owns(f)))
                    .cloned()
                    .collect();
                self.check_volume(&snap, &dir, &mine, &mut push);
            }
        }
        Ok(problems)
    }

    fn check_volume(
        &self,
        snap: &Snapshot,
        dir: &Dir,
        names: &[String],
        push: &mut impl FnMut(Option<&ValidVid>, String, String),
    ) {
        let cfg = &*snap.config;
        let vid = &cfg.vid;
        let n = Names::of(vid);
        let shown = |f: &str| dir.shown(f).display().to_string();
        let img_sig = self.check_images(snap, dir, push);
        let revisions = check_revision_files(cfg, dir, names, img_sig, push);
        let allowed = self
            .revisions_allowed(cfg, dir)
            .map_or(cfg.revisions_to_keep.max(0) as usize + 1, |(k, _)| k);
        if revisions as usize > allowed {
            push(
                Some(vid),
                dir.path().display().to_string(),
                format!(
                    "{revisions} revisions, more than revisions_to_keep={} allows",
                    cfg.revisions_to_keep
                ),
            );
        }
        if cfg.kind() == VolumeKind::Snapshot {
            if let Err(e) = self.resolve_source(cfg) {
                push(
                    Some(vid),
                    String::new(),
                    format!("its source cannot be resolved: {e}"),
                );
            }
        }
        if let Some(p) = self.precache_problem(cfg, dir) {
            push(Some(vid), shown(&n.precache()), p);
        }
        for name in [n.img(), n.dirty(), n.precache()] {
            if let Ok(st) = sys::lstatat(dir.fd(), &name) {
                if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o077 != 0 {
                    push(
                        Some(vid),
                        shown(&name),
                        format!(
                            "mode {:o} lets others read or write it; images are 0600",
                            st.st_mode & 0o777
                        ),
                    );
                }
            }
        }
    }

    /// The problems of a volume's committed and dirty images (and of its
    /// source's image); the committed image's signature, when it has one.
    fn check_images(
        &self,
        snap: &Snapshot,
        dir: &Dir,
        push: &mut impl FnMut(Option<&ValidVid>, String, String),
    ) -> Option<FileSig> {
        let cfg = &*snap.config;
        let vid = &cfg.vid;
        let n = Names::of(vid);
        let kind = cfg.kind();
        let shown = |f: &str| dir.shown(f).display().to_string();
        let img = dir.entry(&n.img()).unwrap_or(Entry::Missing);
        match (&img, kind) {
            (Entry::Other, _) => push(
                Some(vid),
                shown(&n.img()),
                "not a regular file (a symlink?); reflinkfs will not use it".into(),
            ),
            (Entry::Missing, VolumeKind::Origin)
                if !(cfg.optional || snap.running && cfg.revisions_to_keep == -1) =>
            {
                push(
                    Some(vid),
                    shown(&n.img()),
                    "the committed image is missing".into(),
                )
            }
            // In a read-only pool the image's size is the size.
            (Entry::Regular(sig), VolumeKind::Origin)
                if sig.size != cfg.size && !snap.running && !self.read_only() =>
            {
                push(
                    Some(vid),
                    shown(&n.img()),
                    format!(
                        "the image is {} bytes but the config says {}",
                        sig.size, cfg.size
                    ),
                );
            }
            (Entry::Regular(_), VolumeKind::Origin) => {}
            (Entry::Regular(_), _) => push(
                Some(vid),
                shown(&n.img()),
                format!("a {} volume should have no committed image", kind.as_str()),
            ),
            _ => {}
        }
        if !snap.running {
            if let Some((path, p)) = self.source_image_problem(cfg) {
                push(Some(vid), path, p);
            }
            match dir.entry(&n.dirty()).unwrap_or(Entry::Missing) {
                Entry::Missing => {}
                Entry::Regular(_) => push(Some(vid), shown(&n.dirty()), "a dirty image waits to be committed (a stop failed); the next start or pool open commits it".into()),
                Entry::Other => push(Some(vid), shown(&n.dirty()), "not a regular file (a symlink?)".into()),
            }
        }
        match img {
            Entry::Regular(s) => Some(s),
            _ => None,
        }
    }
}

/// The problems of a volume's revision and temporary files among `names`;
/// how many revisions count against `revisions_to_keep`.
fn check_revision_files(
    cfg: &VolumeConfig,
    dir: &Dir,
    names: &[String],
    img_sig: Option<FileSig>,
    push: &mut impl FnMut(Option<&ValidVid>, String, String),
) -> i64 {
    let vid = &cfg.vid;
    let n = Names::of(vid);
    let shown = |f: &str| dir.shown(f).display().to_string();
    let mut revisions = 0i64;
    // Only the newest revision can be a half-made commit's link of N.img;
    // an older one sharing its file is a revert's target.
    let newest = super::revision::half_made_commit_candidate(
        cfg,
        names
            .iter()
            .filter_map(|f| match parse_revision_name(vid.name(), f) {
                Parsed::Revision(r) => Some(r),
                _ => None,
            }),
    );
    for name in names {
        if n.is_temp(name) || *name == n.import() {
            push(
                Some(vid),
                shown(name),
                "a temporary file of an unfinished operation".into(),
            );
            continue;
        }
        match parse_revision_name(vid.name(), name) {
            Parsed::NotOurs => {}
            Parsed::Malformed => push(
                Some(vid),
                shown(name),
                "looks like a revision but the name does not parse".into(),
            ),
            Parsed::Revision(r) => {
                revisions += i64::from(!super::revision::is_protected(cfg, &r));
                let newest = newest.as_ref().is_some_and(|n| n.file_name == r.file_name);
                match dir.entry(name).unwrap_or(Entry::Missing) {
                    Entry::Regular(s) if newest && img_sig.is_some_and(|i| i.same_inode(&s)) => {
                        push(
                            Some(vid),
                            shown(name),
                            "the same file as the committed image (an interrupted commit)".into(),
                        )
                    }
                    Entry::Other => push(Some(vid), shown(name), "not a regular file".into()),
                    _ => {}
                }
            }
        }
    }
    revisions
}
