//! A proptest reference model of the engine (SPEC §2–§5).
//!
//! Random sequences of start, write, stop, revert, resize, set
//! `revisions_to_keep`, prune, pool reopen and crash (drop the pool while
//! volumes run, then reopen) run against a real pool on every test
//! filesystem. After every step the pool is compared with a small in-memory
//! model of images and revisions:
//! - the committed image of each origin volume (`POOL/CLASS/VM/NAME.img`);
//! - the dirty image of each running volume, read through the file that
//!   `Pool::start` returned;
//! - the revisions (`Pool::revisions`: ids, file names, commit times in
//!   order, and the bytes of each file);
//! - the exact set of files in the VM directory (so no temporary file is
//!   left behind and no volume touches another's files);
//! - `Pool::list`: state, size, `revisions_to_keep`, `next_revision` and
//!   `is_outdated`;
//! - `Pool::check`, which must find nothing wrong.
//!
//! The volumes share one VM directory: two origin volumes whose names are a
//! prefix of one another (`priv`, `private`), a snapshot of `private` and a
//! volatile volume.
//!
//! `REFLINKFS_MODEL_CASES` and `REFLINKFS_MODEL_SEED` override the number
//! of cases and the random seed (the seed in use is always printed).

use crate::common;

use common::TestFs;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use reflinkfs::engine::{
    CreateOptions, NewKind, Pool, Property, ResizeOutcome, RevisionId, StopOutcome, ValidVid,
    VolumeStateName,
};
use reflinkfs::ErrorClass;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Default number of random cases per filesystem.
const CASES: u32 = 24;
/// Longest operation sequence of a case.
const MAX_OPS: usize = 40;
const PAGE: u64 = 4096;
const SECTOR: u64 = 512;

/// The volumes of the model. All live in `appvms/vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum V {
    /// Origin volume `priv`: its name is a prefix of `private`.
    Priv,
    /// Origin volume `private`.
    Private,
    /// Snapshot volume `private-snap` of `private`.
    Snap,
    /// Volatile volume `volatile`.
    Vol,
}

use V::*;

const VOLUMES: [V; 4] = [Priv, Private, Snap, Vol];

impl V {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Priv => "priv",
            Private => "private",
            Snap => "private-snap",
            Vol => "volatile",
        }
    }

    fn vid(self) -> ValidVid {
        format!("appvms/vm/{}", self.name()).parse().unwrap()
    }

    /// The index into `Model::origins`, for origin volumes.
    fn origin(self) -> Option<usize> {
        match self {
            Priv => Some(0),
            Private => Some(1),
            Snap | Vol => None,
        }
    }
}

/// Which revision a revert asks for.
#[derive(Clone, Copy, Debug)]
enum Rev {
    /// No revision given: the newest.
    Newest,
    /// The i-th (modulo the count) revision of the current list, by its K.
    Index(usize),
    /// A K that never existed: must be refused.
    Unknown,
}

/// One step of a case.
#[derive(Clone, Copy, Debug)]
enum Op {
    Start(V),
    /// Write to a running volume: offset in 512-byte sectors (modulo the
    /// image size), pattern tag, length in sectors (cut at the end of the
    /// image). Skipped when the volume is not running.
    Write(V, u16, u8, u8),
    Stop(V),
    Revert(V, Rev),
    /// Resize by this many 4 KiB pages: 0 is a same-size no-op, a negative
    /// value a shrink without `allow_shrink`, which is refused.
    Resize(V, i8),
    SetRevisionsToKeep(V, i64),
    /// Lower `revisions_to_keep` to this value (pruning at once) and raise
    /// it back. Skipped unless the volume is an origin volume with a larger
    /// `revisions_to_keep`.
    Prune(V, i64),
    /// Drop the pool and open it again. Skipped while anything runs.
    Reopen,
    /// Drop the pool and the files of running volumes without stopping
    /// anything, as if the process died, and open it again: recovery
    /// (SPEC §4.4) commits the dirty images of origin volumes and deletes
    /// the others.
    Crash,
}

use Op::*;
use Rev::*;

/// The volumes a case creates.
#[derive(Clone, Debug)]
struct Setup {
    /// `revisions_to_keep` of `priv` and `private`.
    rtk: [i64; 2],
    /// Sizes in 4 KiB pages: `priv`, `private`, the snapshot's nominal size,
    /// the volatile volume.
    pages: [u64; 4],
}

/// A running volume in the model.
#[derive(Clone, Debug)]
struct Run {
    dirty: Vec<u8>,
    /// Written to or resized since start.
    modified: bool,
    /// For the snapshot: the generation of its source at start.
    source_generation: u64,
}

#[derive(Clone, Debug)]
struct Origin {
    committed: Vec<u8>,
    /// Oldest first.
    revisions: Vec<(u64, Vec<u8>)>,
    next_k: u64,
    rtk: i64,
    /// How often the committed image was replaced (commit, revert, resize):
    /// a snapshot started before the last replacement is outdated.
    generation: u64,
    /// The revision the last revert went back to: kept beyond
    /// `revisions_to_keep` until the next commit.
    pinned: Option<u64>,
    /// Whether a stopped volume of a reflink pool has its precache: every
    /// replacement of the image makes one, but a revert (a link, in
    /// constant time) drops it until the next commit.
    precache: bool,
    /// Which file the committed image is, and each revision's (by K): a
    /// revert links the revision as the committed image, and a revision
    /// saved then is another name of that file. Reverting to a revision
    /// that is already the committed image's file does nothing.
    file: u64,
    files: std::collections::BTreeMap<u64, u64>,
    next_file: u64,
}

impl Origin {
    /// The committed image is a new file (a commit, import or resize).
    fn new_file(&mut self) {
        self.next_file += 1;
        self.file = self.next_file;
    }

    /// Drops the oldest revisions beyond `revisions_to_keep` (-1 keeps none)
    /// and the one the last revert went back to, which is never dropped.
    fn prune(&mut self) {
        let pinned = self
            .pinned
            .filter(|p| self.revisions.iter().any(|r| r.0 == *p));
        let keep = self.rtk.max(0) as usize + usize::from(pinned.is_some());
        while self.revisions.len() > keep {
            let Some(pos) = self.revisions.iter().position(|r| Some(r.0) != pinned) else {
                break;
            };
            self.revisions.remove(pos);
        }
    }

    /// A commit (or import) replaced the image: no revision is pinned now.
    fn committed(&mut self, bytes: Vec<u8>) {
        self.committed = bytes;
        self.generation += 1;
        self.pinned = None;
        self.precache = true;
        self.new_file();
        self.prune();
    }

    /// Saves the committed image as a new revision when revisions are kept.
    fn save_revision(&mut self) -> Option<u64> {
        if self.rtk <= 0 {
            return None;
        }
        let k = self.next_k;
        self.next_k += 1;
        self.revisions.push((k, self.committed.clone()));
        self.files.insert(k, self.file);
        Some(k)
    }
}

#[derive(Clone, Debug)]
struct Model {
    origins: [Origin; 2],
    /// Nominal (configured) size of the snapshot volume.
    snap_size: u64,
    vol_size: u64,
    running: [Option<Run>; 4],
}

impl Model {
    fn new(setup: &Setup) -> Model {
        let origin = |i: usize| Origin {
            committed: vec![0; (setup.pages[i] * PAGE) as usize],
            revisions: Vec::new(),
            next_k: 1,
            rtk: setup.rtk[i],
            generation: 0,
            pinned: None,
            precache: true,
            file: 0,
            files: Default::default(),
            next_file: 0,
        };
        Model {
            origins: [origin(0), origin(1)],
            snap_size: setup.pages[2] * PAGE,
            vol_size: setup.pages[3] * PAGE,
            running: [None, None, None, None],
        }
    }

    fn snap_source(&self) -> &Origin {
        &self.origins[Private.origin().unwrap()]
    }

    /// The size `list` shows for a stopped volume.
    fn nominal_size(&self, v: V) -> u64 {
        match v {
            Priv | Private => self.origins[v.origin().unwrap()].committed.len() as u64,
            Snap => self
                .snap_size
                .max(self.snap_source().committed.len() as u64),
            Vol => self.vol_size,
        }
    }

    fn current_size(&self, v: V) -> u64 {
        match &self.running[v.index()] {
            Some(r) => r.dirty.len() as u64,
            None => self.nominal_size(v),
        }
    }

    fn rtk(&self, v: V) -> i64 {
        v.origin().map_or(0, |i| self.origins[i].rtk)
    }
}

/// A case in progress: the real pool next to the model.
struct Harness<'a> {
    fs: &'a TestFs,
    path: PathBuf,
    pool: Option<Pool>,
    files: [Option<File>; 4],
    vids: [ValidVid; 4],
    model: Model,
}

/// What a step did, for the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// It succeeded, as the model expected.
    Done,
    /// It was refused, as the model expected.
    Refused,
    /// It did not apply (a write to a stopped volume, a reopen while a
    /// volume runs) and was not run.
    Skipped,
}

type Check = Result<(), String>;
type Step = Result<Outcome, String>;

fn fail<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

/// Checks that `got` is an error of class `class`.
fn expect_err<T: Debug>(got: reflinkfs::Result<T>, class: ErrorClass) -> Step {
    match got {
        Err(e) if e.class() == class => Ok(Outcome::Refused),
        Err(e) => fail(format!(
            "expected a {class:?} error, got {:?} error: {e}",
            e.class()
        )),
        Ok(v) => fail(format!("expected a {class:?} error, got Ok({v:?})")),
    }
}

/// Checks that `got` is `Ok(want)`.
fn expect_ok<T: Debug + PartialEq>(got: reflinkfs::Result<T>, want: T) -> Step {
    match got {
        Ok(v) if v == want => Ok(Outcome::Done),
        Ok(v) => fail(format!("expected Ok({want:?}), got Ok({v:?})")),
        Err(e) => fail(format!("expected Ok({want:?}), got error: {e}")),
    }
}

/// Where the bytes of two images first differ, for readable failures.
fn compare(what: &str, got: &[u8], want: &[u8]) -> Check {
    if got.len() != want.len() {
        return fail(format!(
            "{what}: {} bytes, the model has {}",
            got.len(),
            want.len()
        ));
    }
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        return fail(format!(
            "{what}: byte {i} is {:#04x}, the model has {:#04x}",
            got[i], want[i]
        ));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

impl<'a> Harness<'a> {
    fn new(fs: &'a TestFs, setup: &Setup) -> Result<Harness<'a>, String> {
        let (pool, path) = common::new_pool_with(fs, "model", 1);
        let vids = VOLUMES.map(V::vid);
        for v in VOLUMES {
            let mut opts = CreateOptions::origin(setup.pages[v.index()] * PAGE);
            match v {
                Priv | Private => opts.revisions_to_keep = Some(setup.rtk[v.index()]),
                Snap => opts.kind = NewKind::SnapshotOf(Private.vid()),
                Vol => opts.kind = NewKind::Volatile,
            }
            pool.create(&vids[v.index()], &opts)
                .map_err(|e| format!("creating {}: {e}", v.name()))?;
        }
        Ok(Harness {
            fs,
            path,
            pool: Some(pool),
            files: [None, None, None, None],
            vids,
            model: Model::new(setup),
        })
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("the pool is open")
    }

    fn vid(&self, v: V) -> &ValidVid {
        &self.vids[v.index()]
    }

    fn vm_dir(&self) -> PathBuf {
        self.path.join("appvms").join("vm")
    }

    /// Runs one operation on the pool and the model.
    fn step(&mut self, op: Op) -> Step {
        match op {
            Start(v) => self.start(v),
            Write(v, off, tag, len) => self.write(v, off, tag, len),
            Stop(v) => self.stop(v),
            Revert(v, which) => self.revert(v, which),
            Resize(v, pages) => self.resize(v, pages),
            SetRevisionsToKeep(v, n) => self.set_rtk(v, n),
            Prune(v, keep) => self.prune(v, keep),
            Reopen => self.reopen(),
            Crash => self.crash(),
        }
    }

    fn start(&mut self, v: V) -> Step {
        let got = self.pool().start(self.vid(v));
        let m = &mut self.model;
        if m.running[v.index()].is_some() {
            return expect_err(got, ErrorClass::Busy);
        }
        if v == Snap && m.running[Private.index()].is_some() && m.snap_source().rtk == -1 {
            // The source has no committed image while it runs with -1.
            return expect_err(got, ErrorClass::Busy);
        }
        let file = got.map_err(|e| format!("start failed: {e}"))?;
        let dirty = match v {
            Priv | Private => m.origins[v.origin().unwrap()].committed.clone(),
            Snap => {
                let mut d = m.snap_source().committed.clone();
                if d.len() < m.snap_size as usize {
                    d.resize(m.snap_size as usize, 0);
                }
                d
            }
            Vol => vec![0; m.vol_size as usize],
        };
        m.running[v.index()] = Some(Run {
            dirty,
            modified: false,
            source_generation: m.snap_source().generation,
        });
        self.files[v.index()] = Some(file);
        Ok(Outcome::Done)
    }

    fn write(&mut self, v: V, off: u16, tag: u8, len: u8) -> Step {
        let Some(run) = self.model.running[v.index()].as_mut() else {
            return Ok(Outcome::Skipped);
        };
        let size = run.dirty.len() as u64;
        let off = (u64::from(off) % (size / SECTOR)) * SECTOR;
        let len = (u64::from(len.max(1)) * SECTOR).min(size - off) as usize;
        let data = common::pattern(tag, len);
        let file = self.files[v.index()]
            .as_ref()
            .expect("a running volume has its file");
        file.write_all_at(&data, off)
            .map_err(|e| format!("writing {len} bytes at {off}: {e}"))?;
        run.dirty[off as usize..off as usize + len].copy_from_slice(&data);
        run.modified = true;
        Ok(Outcome::Done)
    }

    fn stop(&mut self, v: V) -> Step {
        // The FUSE layer stops a volume on the last release: close first.
        self.files[v.index()] = None;
        let got = self.pool().stop(self.vid(v));
        let m = &mut self.model;
        let Some(run) = m.running[v.index()].take() else {
            return expect_err(got, ErrorClass::Refused);
        };
        let want = match v.origin() {
            None => {
                if v == Vol {
                    m.vol_size = run.dirty.len() as u64;
                }
                StopOutcome::Discarded
            }
            Some(i) => {
                let o = &mut m.origins[i];
                if o.rtk == -1 {
                    // Start and stop just rename; the dirty image is the
                    // only copy, so it is always committed.
                    o.committed(run.dirty);
                    StopOutcome::Committed { revision: None }
                } else if !run.modified {
                    StopOutcome::Unchanged
                } else {
                    let revision = o.save_revision();
                    o.committed(run.dirty);
                    StopOutcome::Committed { revision }
                }
            }
        };
        expect_ok(got, want)
    }

    fn revert(&mut self, v: V, which: Rev) -> Step {
        let m = &self.model;
        let (arg, target) = match v.origin() {
            None => (None, None),
            Some(i) => {
                let o = &m.origins[i];
                match which {
                    Newest => (None, o.revisions.last().cloned()),
                    Index(_) if o.revisions.is_empty() => (Some(o.next_k), None),
                    Index(j) => {
                        let r = o.revisions[j % o.revisions.len()].clone();
                        (Some(r.0), Some(r))
                    }
                    Unknown => (Some(o.next_k + 1000), None),
                }
            }
        };
        let arg = arg.map(|k| k.to_string());
        let got = self.pool().revert(self.vid(v), arg.as_deref());
        let m = &mut self.model;
        // Running is checked first, for every type.
        if m.running[v.index()].is_some() {
            return expect_err(got, ErrorClass::Busy);
        }
        let Some(i) = v.origin() else {
            return expect_err(got, ErrorClass::Refused);
        };
        let o = &mut m.origins[i];
        if o.rtk == -1 {
            return expect_err(got, ErrorClass::Refused);
        }
        let Some((target_k, bytes)) = target else {
            return expect_err(got, ErrorClass::NotFound);
        };
        // Already the committed image's file: nothing to do.
        if o.files.get(&target_k) == Some(&o.file) {
            return expect_ok(got, None);
        }
        // The current image becomes a revision; the target stays (pinned
        // until the next commit) and so does the saved one, the newest;
        // older ones go down to revisions_to_keep + 1.
        let saved = o.save_revision();
        o.file = o.files[&target_k];
        o.committed = bytes;
        o.generation += 1;
        o.pinned = Some(target_k);
        o.precache = false;
        o.prune();
        expect_ok(got, saved)
    }

    fn resize(&mut self, v: V, pages: i8) -> Step {
        let m = &self.model;
        let current = m.current_size(v);
        let new = current
            .checked_add_signed(i64::from(pages) * PAGE as i64)
            .unwrap();
        let got = self.pool().resize(self.vid(v), new, false);
        let m = &mut self.model;
        if pages == 0 {
            return expect_ok(got, ResizeOutcome::Unchanged);
        }
        if pages < 0 {
            return expect_err(got, ErrorClass::Refused);
        }
        let new = new as usize;
        if let Some(run) = m.running[v.index()].as_mut() {
            run.dirty.resize(new, 0);
            run.modified = true;
            if v == Vol {
                m.vol_size = new as u64;
            }
            return expect_ok(got, ResizeOutcome::Running);
        }
        match v {
            Priv | Private => {
                let o = &mut m.origins[v.origin().unwrap()];
                o.committed.resize(new, 0);
                o.generation += 1;
                o.precache = true;
                o.new_file();
                expect_ok(got, ResizeOutcome::Committed)
            }
            Snap => {
                m.snap_size = new as u64;
                expect_ok(got, ResizeOutcome::Nominal)
            }
            Vol => {
                m.vol_size = new as u64;
                expect_ok(got, ResizeOutcome::Nominal)
            }
        }
    }

    fn set_rtk(&mut self, v: V, n: i64) -> Step {
        let got = self.pool().set(self.vid(v), Property::RevisionsToKeep(n));
        let running = self.model.running[v.index()].is_some();
        // To or from -1 is refused while a snapshot of the volume runs too.
        let snap_runs = v == Private && self.model.running[Snap.index()].is_some();
        let Some(i) = v.origin() else {
            if n == 0 {
                return expect_ok(got, ());
            }
            return expect_err(got, ErrorClass::Refused);
        };
        let o = &mut self.model.origins[i];
        if (running || snap_runs) && (n == -1) != (o.rtk == -1) {
            return expect_err(got, ErrorClass::Busy);
        }
        let lowered = n < o.rtk;
        if o.rtk == -1 && n != -1 {
            o.precache = true;
        }
        o.rtk = n;
        if lowered {
            o.prune();
        }
        expect_ok(got, ())
    }

    fn prune(&mut self, v: V, keep: i64) -> Step {
        let rtk = self.model.rtk(v);
        if v.origin().is_none() || keep < 0 || keep >= rtk {
            return Ok(Outcome::Skipped);
        }
        let lowered = self
            .set_rtk(v, keep)
            .map_err(|e| format!("lowering revisions_to_keep to {keep}: {e}"))?;
        let raised = self
            .set_rtk(v, rtk)
            .map_err(|e| format!("raising revisions_to_keep back to {rtk}: {e}"))?;
        if (lowered, raised) != (Outcome::Done, Outcome::Done) {
            return fail("the model expected both sets to succeed");
        }
        Ok(Outcome::Done)
    }

    fn reopen(&mut self) -> Step {
        if self.model.running.iter().any(Option::is_some) {
            return Ok(Outcome::Skipped);
        }
        drop(self.pool.take());
        let pool = Pool::open(&self.path).map_err(|e| format!("reopening the pool: {e}"))?;
        self.pool = Some(pool);
        Ok(Outcome::Done)
    }

    fn crash(&mut self) -> Step {
        drop(self.pool.take());
        self.files = [None, None, None, None];
        let pool = Pool::open(&self.path).map_err(|e| format!("reopening the pool: {e}"))?;
        self.pool = Some(pool);
        let m = &mut self.model;
        for v in VOLUMES {
            let Some(run) = m.running[v.index()].take() else {
                continue;
            };
            if let Some(i) = v.origin() {
                // Committed as at a stop, but even when unmodified: recovery
                // does not know what the image looked like at start.
                let o = &mut m.origins[i];
                if o.rtk != -1 {
                    o.save_revision();
                }
                o.committed(run.dirty);
            }
        }
        Ok(Outcome::Done)
    }

    /// Compares the whole pool with the model.
    fn check(&self) -> Check {
        let dir = self.vm_dir();
        let m = &self.model;
        let mut expected_files: Vec<String> = Vec::new();
        let listed = self
            .pool()
            .list()
            .map_err(|e| format!("list failed: {e}"))?;
        if listed.len() != VOLUMES.len() {
            return fail(format!(
                "list shows {} volumes, not {}",
                listed.len(),
                VOLUMES.len()
            ));
        }
        for v in VOLUMES {
            let name = v.name();
            let running = m.running[v.index()].as_ref();
            let ctx = |what: &str| format!("{name}: {what}");

            // Revisions: ids and bytes.
            let revs = self
                .pool()
                .revisions(self.vid(v))
                .map_err(|e| ctx(&format!("revisions failed: {e}")))?;
            let model_revs: &[(u64, Vec<u8>)] = match v.origin() {
                Some(i) => &m.origins[i].revisions,
                None => &[],
            };
            // Commit times only grow with K (the format sorts as text).
            if let Some(w) = revs.windows(2).find(|w| w[0].timestamp > w[1].timestamp) {
                return fail(ctx(&format!(
                    "revision {} ({}) is newer than revision {} ({})",
                    w[0].id, w[0].timestamp, w[1].id, w[1].timestamp
                )));
            }
            let got_ids: Vec<RevisionId> = revs.iter().map(|r| r.id.clone()).collect();
            let want_ids: Vec<RevisionId> = model_revs
                .iter()
                .map(|(k, _)| RevisionId::Numbered(*k))
                .collect();
            if got_ids != want_ids {
                return fail(ctx(&format!(
                    "revisions {got_ids:?}, the model has {want_ids:?}"
                )));
            }
            for (r, (k, bytes)) in revs.iter().zip(model_revs) {
                if r.file_name != format!("{name}.img.{k}@{}", r.timestamp) {
                    return fail(ctx(&format!("revision {k} is in file {:?}", r.file_name)));
                }
                let got = read_file(&dir.join(&r.file_name))?;
                compare(&ctx(&format!("revision {k}")), &got, bytes)?;
                expected_files.push(r.file_name.clone());
            }

            // The committed image. There is none while the volume runs with
            // revisions_to_keep=-1 (start renamed it); the file-set check
            // below catches one that is there anyway.
            if let Some(i) = v.origin() {
                if !(running.is_some() && m.origins[i].rtk == -1) {
                    let got = read_file(&dir.join(format!("{name}.img")))?;
                    compare(&ctx("committed image"), &got, &m.origins[i].committed)?;
                    expected_files.push(format!("{name}.img"));
                }
                // A stopped origin of a reflink pool has its precache, a
                // copy of the committed image; a start renamed it away.
                if self.fs.reflink
                    && running.is_none()
                    && m.origins[i].rtk != -1
                    && m.origins[i].precache
                {
                    let got = read_file(&dir.join(format!("{name}-precache.img")))?;
                    compare(&ctx("precache"), &got, &m.origins[i].committed)?;
                    expected_files.push(format!("{name}-precache.img"));
                }
            }

            // The dirty image, through the file start returned.
            if let Some(run) = running {
                let file = self.files[v.index()]
                    .as_ref()
                    .expect("a running volume has its file");
                let len = file.metadata().map_err(|e| ctx(&e.to_string()))?.len();
                let mut got = vec![0u8; len as usize];
                file.read_exact_at(&mut got, 0)
                    .map_err(|e| ctx(&format!("reading the dirty image: {e}")))?;
                compare(&ctx("dirty image"), &got, &run.dirty)?;
                expected_files.push(format!("{name}-dirty.img"));
            }

            // list: state, size, revisions_to_keep, next_revision.
            let vid = self.vid(v).to_string();
            let Some(info) = listed.iter().find(|i| i.vid == vid) else {
                return fail(ctx("not in list"));
            };
            let want_state = if running.is_some() {
                VolumeStateName::Running
            } else {
                VolumeStateName::Stopped
            };
            if info.state != want_state || info.running != running.is_some() {
                return fail(ctx(&format!(
                    "list shows state {:?} (running={}), the model has {want_state:?}",
                    info.state, info.running
                )));
            }
            if info.size != m.current_size(v) {
                return fail(ctx(&format!(
                    "list shows size {}, the model has {}",
                    info.size,
                    m.current_size(v)
                )));
            }
            if info.revisions_to_keep != m.rtk(v) {
                return fail(ctx(&format!(
                    "list shows revisions_to_keep {}, the model has {}",
                    info.revisions_to_keep,
                    m.rtk(v)
                )));
            }
            let want_outdated = match (v, running) {
                (Snap, Some(run)) => Some(run.source_generation != m.snap_source().generation),
                (Snap, None) => Some(false),
                _ => None,
            };
            if info.is_outdated != want_outdated {
                return fail(ctx(&format!(
                    "list shows is_outdated {:?}, the model has {want_outdated:?}",
                    info.is_outdated
                )));
            }
            if let Some(i) = v.origin() {
                if info.next_revision != m.origins[i].next_k {
                    return fail(ctx(&format!(
                        "list shows next_revision {}, the model has {}",
                        info.next_revision, m.origins[i].next_k
                    )));
                }
            }
        }

        // The engine's own consistency check finds nothing wrong.
        let problems = self
            .pool()
            .check(None)
            .map_err(|e| format!("check failed: {e}"))?;
        if !problems.is_empty() {
            return fail(format!("check reports {problems:?}"));
        }

        // Exactly the expected files: no temporary files, nothing stray.
        let mut got_files = common::files_of(&self.path, self.vid(Priv));
        got_files.sort();
        expected_files.sort();
        for f in &got_files {
            if f.contains('~') || f.ends_with("-import.img") {
                return fail(format!("temporary file {f} left in {}", dir.display()));
            }
        }
        if got_files != expected_files {
            return fail(format!(
                "files in {}: {got_files:?}, expected {expected_files:?}",
                dir.display()
            ));
        }
        Ok(())
    }
}

/// How many operations of each kind ran: done, refused (as expected) and
/// skipped.
#[derive(Default)]
struct Stats {
    by_kind: BTreeMap<&'static str, [usize; 3]>,
}

impl Stats {
    fn add(&mut self, op: Op, outcome: Outcome) {
        let counts = self.by_kind.entry(op.kind()).or_default();
        counts[outcome as usize] += 1;
    }

    fn run(&self) -> usize {
        self.by_kind.values().map(|c| c[0] + c[1]).sum()
    }

    fn summary(&self) -> String {
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, [done, refused, skipped])| format!("{k} {done}/{refused}/{skipped}"))
            .collect();
        format!("done/refused/skipped: {}", kinds.join(", "))
    }
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Start(_) => "start",
            Write(..) => "write",
            Stop(_) => "stop",
            Revert(..) => "revert",
            Resize(..) => "resize",
            SetRevisionsToKeep(..) => "set",
            Prune(..) => "prune",
            Reopen => "reopen",
            Crash => "crash",
        }
    }
}

/// Runs one case on a fresh pool; on disagreement, says at which step.
fn run_case(fs: &TestFs, setup: &Setup, ops: &[Op], stats: &RefCell<Stats>) -> Check {
    let mut h = Harness::new(fs, setup)?;
    let result = (|| {
        h.check().map_err(|e| format!("after setup: {e}"))?;
        for (i, op) in ops.iter().enumerate() {
            let outcome = h.step(*op).map_err(|e| format!("step {i} {op:?}: {e}"))?;
            stats.borrow_mut().add(*op, outcome);
            h.check()
                .map_err(|e| format!("after step {i} {op:?}: {e}"))?;
        }
        Ok(())
    })();
    // Each case has its own pool directory; remove it once done.
    let scratch = h
        .path
        .parent()
        .expect("the pool lies in a scratch dir")
        .to_owned();
    let fs_name = h.fs.name.clone();
    drop(h);
    if let Err(e) = std::fs::remove_dir_all(&scratch) {
        eprintln!("[{fs_name}] could not remove {}: {e}", scratch.display());
    }
    result
}

/// The case as Rust source, ready to paste into a regression test.
fn show_case(setup: &Setup, ops: &[Op]) -> String {
    let mut s = format!("    let setup = {setup:?};\n    let ops = [\n");
    for op in ops {
        s.push_str(&format!("        {op:?},\n"));
    }
    s.push_str("    ];\n");
    s
}

/// The test filesystems, with the engine's INFO log turned off unless
/// `RUST_LOG` asks for it: thousands of operations (and proptest's
/// shrinking) would bury the failure report.
fn filesystems() -> Vec<TestFs> {
    let list = common::filesystems();
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    list
}

/// Runs a fixed case on every filesystem (for regression tests).
fn replay(setup: Setup, ops: &[Op]) {
    for fs in filesystems() {
        if let Err(e) = run_case(&fs, &setup, ops, &RefCell::default()) {
            panic!("[{}] {e}\ncase:\n{}", fs.name, show_case(&setup, ops));
        }
    }
}

fn volume() -> impl Strategy<Value = V> {
    prop_oneof![3 => Just(Priv), 3 => Just(Private), 2 => Just(Snap), 1 => Just(Vol)]
}

/// Mostly the origin volumes, for revert and set.
fn mostly_origin() -> impl Strategy<Value = V> {
    prop_oneof![5 => Just(Priv), 5 => Just(Private), 1 => Just(Snap), 1 => Just(Vol)]
}

fn write(v: V) -> impl Strategy<Value = Op> {
    (any::<u16>(), any::<u8>(), 1u8..=16).prop_map(move |(o, t, l)| Write(v, o, t, l))
}

/// Any single operation, in any state (many are refused or skipped).
fn revision() -> impl Strategy<Value = Rev> {
    prop_oneof![2 => Just(Newest), 3 => (0usize..4).prop_map(Index), 1 => Just(Unknown)]
}

fn op() -> impl Strategy<Value = Op> {
    let rev = revision();
    prop_oneof![
        2 => volume().prop_map(Start),
        2 => volume().prop_flat_map(write),
        2 => volume().prop_map(Stop),
        4 => (mostly_origin(), rev).prop_map(|(v, r)| Revert(v, r)),
        2 => (volume(), -1i8..=3).prop_map(|(v, p)| Resize(v, p)),
        3 => (mostly_origin(), -1i64..=3).prop_map(|(v, n)| SetRevisionsToKeep(v, n)),
        2 => (mostly_origin(), 0i64..=2).prop_map(|(v, k)| Prune(v, k)),
        3 => Just(Reopen),
        1 => Just(Crash),
    ]
}

/// A run of a volume: start, some writes (none for an unchanged stop),
/// perhaps a running resize, and usually a stop (otherwise it keeps
/// running while the next operations come).
fn session() -> impl Strategy<Value = Vec<Op>> {
    volume().prop_flat_map(|v| {
        (
            proptest::collection::vec(write(v), 0..=4),
            proptest::option::weighted(0.2, 0i8..=2),
            proptest::bool::weighted(0.8),
        )
            .prop_map(move |(writes, resize, stop)| {
                let mut ops = vec![Start(v)];
                ops.extend(writes);
                ops.extend(resize.map(|p| Resize(v, p)));
                if stop {
                    ops.push(Stop(v));
                }
                ops
            })
    })
}

/// A commit of an origin volume followed by a revert, so that reverts
/// often find revisions.
fn commit_and_revert() -> impl Strategy<Value = Vec<Op>> {
    prop_oneof![Just(Priv), Just(Private)].prop_flat_map(|v| {
        (proptest::collection::vec(write(v), 1..=3), revision()).prop_map(move |(writes, rev)| {
            let mut ops = vec![Start(v)];
            ops.extend(writes);
            ops.extend([Stop(v), Revert(v, rev)]);
            ops
        })
    })
}

fn case() -> impl Strategy<Value = (Setup, Vec<Op>)> {
    // Mostly values that keep revisions, so reverts have something to do.
    let rtk = || prop_oneof![1 => Just(-1i64), 1 => Just(0), 4 => 1i64..=3];
    let setup = (
        [rtk(), rtk()],
        [16u64..=64, 16u64..=64, 8u64..=64, 16u64..=64],
    )
        .prop_map(|(rtk, pages)| Setup { rtk, pages });
    let chunk = prop_oneof![
        3 => session(),
        2 => op().prop_map(|o| vec![o]),
        1 => (prop_oneof![Just(Priv), Just(Private)], revision()).prop_map(|(v, r)| vec![Revert(v, r)]),
        1 => commit_and_revert(),
    ];
    let ops = proptest::collection::vec(chunk, 1..=16).prop_map(|chunks| {
        let mut ops: Vec<Op> = chunks.concat();
        ops.truncate(MAX_OPS);
        ops
    });
    (setup, ops)
}

fn env_number(var: &str) -> Option<u64> {
    let v = std::env::var(var).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a number")),
    )
}

#[test]
fn engine_matches_model() {
    let cases = env_number("REFLINKFS_MODEL_CASES").map_or(CASES, |n| n as u32);
    let seed = env_number("REFLINKFS_MODEL_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
    });
    for fs in filesystems() {
        let config = Config {
            cases,
            failure_persistence: None,
            rng_seed: RngSeed::Fixed(seed),
            max_shrink_iters: 400,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let stats = RefCell::new(Stats::default());
        let began = Instant::now();
        let result = runner.run(&case(), |(setup, ops)| {
            run_case(&fs, &setup, &ops, &stats).map_err(TestCaseError::fail)
        });
        match result {
            Ok(()) => {
                let stats = stats.borrow();
                eprintln!(
                    "[{}] model: {cases} cases, {} operations run, in {:.1?} (seed {seed}); {}",
                    fs.name,
                    stats.run(),
                    began.elapsed(),
                    stats.summary()
                )
            }
            Err(TestError::Fail(reason, (setup, ops))) => panic!(
                "[{}] the engine disagrees with the model (REFLINKFS_MODEL_SEED={seed}):\n{reason}\n\
                 minimal case:\n{}",
                fs.name,
                show_case(&setup, &ops)
            ),
            Err(TestError::Abort(reason)) => {
                panic!("[{}] model test aborted (seed {seed}): {reason}", fs.name)
            }
        }
    }
}

// Regression cases the model found.

/// Replays, with `priv` and `private` keeping one revision, a first commit
/// of `priv` and then `then`.
fn replay_after_a_commit(then: &[Op]) {
    let setup = Setup {
        rtk: [1, 1],
        pages: [16, 16, 16, 16],
    };
    let mut ops = vec![Start(Priv), Write(Priv, 0, 1, 1), Stop(Priv)];
    ops.extend_from_slice(then);
    replay(setup, &ops);
}

/// Opening a pool used to prune every origin volume down to
/// `revisions_to_keep` (recovery called `prune_revisions`), so the revision
/// a revert kept (SPEC §5: "Revision K stays in the list") disappeared at
/// the next open, which every offline CLI command does: here revision 1 was
/// gone after the reopen, leaving `[2]`.
#[test]
fn revert_then_reopen_keeps_revisions() {
    replay_after_a_commit(&[Revert(Priv, Newest), Reopen]);
}

/// Engine bug: two reverts in a row leave revisions_to_keep+2 revisions
/// (revert saves the current image and prunes nothing, SPEC §5), and then
/// `Pool::check` reports "3 revisions, more than revisions_to_keep=1
/// allows", although only valid operations ran.
#[test]
fn revert_twice_passes_check() {
    replay_after_a_commit(&[Revert(Priv, Newest), Revert(Priv, Newest)]);
}
