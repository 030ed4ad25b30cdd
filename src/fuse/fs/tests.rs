//! The open, release and commit paths without a kernel: a pool in a
//! temporary directory (copy mode), driven through the same calls the
//! adapter makes, with a fake passthrough registration.
use super::*;
use crate::engine::Property;
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// What a registration would be on a real mount.
#[derive(Debug)]
struct FakeBacking;

fn register(_: &File) -> std::io::Result<FakeBacking> {
    Ok(FakeBacking)
}

const MIB: u64 = 1 << 20;

struct Setup {
    fs: Arc<ReflinkFs<FakeBacking>>,
    dir: tempfile::TempDir,
}

fn setup(volumes: &[&str], passthrough: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pool = crate::engine::admin::scratch_pool(&dir.path().join("pool"), volumes, MIB);
    let fs = ReflinkFs::<FakeBacking>::new(
        Arc::new(pool),
        FsOptions {
            passthrough,
            committers: 2,
        },
    );
    fs.set_passthrough(passthrough);
    Setup {
        fs: Arc::new(fs),
        dir,
    }
}

impl Setup {
    fn ino(&self, path: &str) -> u64 {
        let mut ino = 1;
        for part in path.split('/') {
            ino = self.fs.lookup(ino, part).unwrap().ino;
        }
        ino
    }

    fn open(&self, path: &str, may_wait: bool) -> Result<u64, TryError> {
        let ino = self.ino(path);
        self.fs
            .open(ino, libc::O_RDWR, &register, may_wait)
            .map(|o| o.fh)
    }

    fn state(&self, vid: &str) -> &'static str {
        self.fs
            .pool
            .snapshot(&vid.parse().unwrap())
            .unwrap()
            .state
            .as_str()
    }

    fn wait_stopped(&self, vid: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        while self.state(vid) != "stopped" {
            assert!(Instant::now() < end, "{vid} did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn committed(&self, vid: &str, off: u64, len: usize) -> Vec<u8> {
        let f = File::open(self.dir.path().join("pool").join(format!("{vid}.img"))).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off).unwrap();
        buf
    }
}

#[test]
fn the_last_release_commits_on_a_committer_thread() {
    let s = setup(&["c/v/a"], true);
    let first = s.open("c/v/a-dirty.img", true).unwrap();
    let second = s
        .open("c/v/a-dirty.img", false)
        .expect("a running volume opens at once");
    assert_eq!(s.fs.write(first, 0, b"one").unwrap(), 3);
    assert_eq!(s.fs.write(second, 3, b"two").unwrap(), 3);
    s.fs.release(first);
    assert_eq!(s.state("c/v/a"), "running", "one lease is left");
    s.fs.release(second);
    s.wait_stopped("c/v/a");
    assert_eq!(s.committed("c/v/a", 0, 6), b"onetwo");
}

#[test]
fn writes_stop_at_the_volumes_end() {
    let s = setup(&["c/v/a"], false);
    let fh = s.open("c/v/a-dirty.img", true).unwrap();
    assert_eq!(s.fs.write(fh, MIB - 2, b"abcd").unwrap(), 2);
    assert_eq!(s.fs.write(fh, MIB, b"x"), Err(libc::EFBIG));
    let ino = s.ino("c/v/a-dirty.img");
    assert_eq!(
        s.fs.fallocate(ino, fh, MIB - 4096, 8192, 0),
        Err(libc::EFBIG)
    );
    s.fs.release(fh);
    s.wait_stopped("c/v/a");
}

/// Many threads open, write and close four volumes at once: every
/// commit lands, no volume is left running, nothing fails.
#[test]
fn concurrent_opens_and_closes_of_four_volumes_all_commit() {
    let vols = ["c/v/a", "c/v/b", "c/w/a", "d/x/y"];
    let s = Arc::new(setup(&vols, true));
    let mut threads = Vec::new();
    for t in 0..8u8 {
        let s = s.clone();
        threads.push(std::thread::spawn(move || {
            for round in 0..40u8 {
                let v = vols[usize::from(round + t) % vols.len()];
                let fh = s.open(&format!("{v}-dirty.img"), true).unwrap();
                let data = [t ^ round; 512];
                s.fs.write(fh, u64::from(t) * 512, &data).unwrap();
                s.fs.release(fh);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    for v in vols {
        s.wait_stopped(v);
    }
    // Each thread's last write to each volume is committed.
    for t in 0..8u8 {
        for (i, v) in vols.iter().enumerate() {
            let last = (0..40u8)
                .rfind(|r| usize::from(r + t) % vols.len() == i)
                .unwrap();
            assert_eq!(
                s.committed(v, u64::from(t) * 512, 512),
                vec![t ^ last; 512],
                "{v}, thread {t}"
            );
        }
    }
}

/// `rw` is checked under the volume's lock at start: however opens and
/// `set rw` interleave, a writable lease never exists while the volume
/// is read-only.
#[test]
fn a_writable_open_never_races_past_set_rw_false() {
    let s = Arc::new(setup(&["c/v/a"], false));
    let vid: ValidVid = "c/v/a".parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let setter = {
        let (s, vid, stop) = (s.clone(), vid.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                // Refused while running; that is fine.
                let _ = s.fs.pool.set(&vid, Property::Rw(n % 2 == 0));
                n += 1;
            }
        })
    };
    let (mut writable, mut refused) = (0, 0);
    let end = Instant::now() + Duration::from_secs(20);
    while (writable < 20 || refused < 20) && Instant::now() < end {
        match s.open("c/v/a-dirty.img", true) {
            Ok(fh) => {
                writable += 1;
                assert!(
                    s.fs.pool.snapshot(&vid).unwrap().config.rw,
                    "a writable lease on a read-only volume"
                );
                s.fs.release(fh);
            }
            Err(TryError::Errno(libc::EROFS)) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    setter.join().unwrap();
    assert!(
        writable > 0 && refused > 0,
        "{writable} opens, {refused} refused"
    );
}

#[cfg(feature = "failpoints")]
mod paused {
    use super::*;
    use crate::engine::failpoint;

    /// A pool of `a` and `c/v/b` whose commit of `a` (with "held" written)
    /// is held at its failpoint until the gate returned is resumed.
    fn held_commit(a: &str) -> (Arc<Setup>, Arc<(Mutex<bool>, parking_lot::Condvar)>) {
        let s = Arc::new(setup(&[a, "c/v/b"], true));
        let gate = failpoint::pause_for("pause.commit", a);
        let fh = s.open(&format!("{a}-dirty.img"), true).unwrap();
        s.fs.write(fh, 0, b"held").unwrap();
        s.fs.release(fh);
        failpoint::wait_paused(&gate);
        (s, gate)
    }

    /// A commit held in progress: an open of that volume would wait
    /// (and the adapter does it on the waiting pool), while every
    /// other volume opens, commits, lists and stats as usual.
    #[test]
    fn a_held_commit_stalls_nothing_but_its_own_volume() {
        let a = "c/v/apause";
        let (s, gate) = held_commit(a);
        assert_eq!(s.state(a), "committing");
        assert_eq!(
            s.open(&format!("{a}-dirty.img"), false).unwrap_err(),
            TryError::WouldWait(a.parse().unwrap())
        );
        // Everything else goes on.
        let b = s.open("c/v/b-dirty.img", true).unwrap();
        s.fs.write(b, 0, b"free").unwrap();
        s.fs.release(b);
        s.wait_stopped("c/v/b");
        assert_eq!(s.committed("c/v/b", 0, 4), b"free");
        let vm = s.ino("c/v");
        assert_eq!(s.fs.readdir(vm).unwrap().len(), 5, "readdir of the VM");
        s.fs.getattr(s.ino(&format!("{a}-dirty.img")), None)
            .unwrap();
        s.fs.xattrs(s.ino(&format!("{a}-dirty.img"))).unwrap();
        assert!(s.fs.pool.list().is_ok());
        assert!(s.fs.pool.info(&a.parse().unwrap()).is_ok());
        // A waiting open of the held volume returns once it commits.
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.open(&format!("{a}-dirty.img"), true))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "the open waits for the commit");
        failpoint::resume("pause.commit", a, &gate);
        let fh = waiter.join().unwrap().unwrap();
        s.fs.release(fh);
        s.wait_stopped(a);
        assert_eq!(s.committed(a, 0, 4), b"held");
    }

    /// The waiting pool: a held volume's waiting requests queue behind one
    /// another (bounded: past [`PER_VOLUME`] they are answered EBUSY at
    /// once), another volume's waiting open runs meanwhile, and every
    /// queued request completes once the volume is let go.
    #[test]
    fn the_waiting_pool_serves_other_volumes_and_is_bounded() {
        let a = "c/v/wpause";
        let vid: ValidVid = a.parse().unwrap();
        let (s, gate) = held_commit(a);
        let ino = s.ino(&format!("{a}-dirty.img"));
        assert_eq!(
            s.fs.set_size(ino, 2 * MIB, false).unwrap_err(),
            TryError::WouldWait(vid.clone()),
            "a truncate never waits on the caller's thread"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let mut admitted = 0;
        let refused = loop {
            let (fs, tx, n) = (s.fs.clone(), tx.clone(), admitted);
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            s.fs.defer(
                vid.clone(),
                Box::new(move |go| {
                    let r = go.map_err(TryError::Errno);
                    if r.is_err() {
                        done_tx.send(r.clone()).unwrap();
                        return;
                    }
                    let _ = done_tx.send(Ok(()));
                    let r = fs.set_size(ino, 2 * MIB, true).map(|at| at.size);
                    tx.send((n, r)).unwrap();
                }),
            );
            // A refusal is answered at once, on this thread.
            match done_rx.try_recv() {
                Ok(Err(e)) => break e,
                _ => admitted += 1,
            }
            assert!(admitted <= PER_VOLUME + 1, "the queue is not bounded");
        };
        assert_eq!(refused, TryError::Errno(libc::EBUSY));
        assert!(admitted >= PER_VOLUME, "{admitted} admitted");
        // Another volume's open that waits (a start) runs meanwhile.
        let (open_tx, open_rx) = std::sync::mpsc::channel();
        let (fs, b_ino) = (s.fs.clone(), s.ino("c/v/b-dirty.img"));
        s.fs.defer(
            "c/v/b".parse().unwrap(),
            Box::new(move |go| {
                go.unwrap();
                let fh = fs.open(b_ino, libc::O_RDWR, &register, true).unwrap().fh;
                fs.write(fh, 0, b"free").unwrap();
                fs.release(fh);
                open_tx.send(()).unwrap();
            }),
        );
        open_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("another volume's open ran while the held one waits");
        s.wait_stopped("c/v/b");
        assert_eq!(s.committed("c/v/b", 0, 4), b"free");
        assert!(rx.try_recv().is_err(), "the held volume's requests wait");
        failpoint::resume("pause.commit", a, &gate);
        let mut done: Vec<usize> = Vec::new();
        for _ in 0..admitted {
            let (n, r) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            assert_eq!(r, Ok(2 * MIB), "request {n}");
            done.push(n);
        }
        assert_eq!(done, (0..admitted).collect::<Vec<_>>(), "in arrival order");
        s.wait_stopped(a);
        assert_eq!(s.committed(a, 0, 4), b"held");
    }

    /// An open that waits on a volume being removed fails cleanly
    /// (ENOENT) when the removal is done, and leaves no file behind.
    #[test]
    fn an_open_waiting_on_a_removal_fails_and_orphans_nothing() {
        let s = Arc::new(setup(&["c/v/rpause", "c/v/other"], true));
        let vid = "c/v/rpause";
        let ino = s.ino(&format!("{vid}-dirty.img"));
        let gate = failpoint::pause_for("pause.remove", vid);
        let remover = {
            let s = s.clone();
            std::thread::spawn(move || s.fs.pool.remove(&vid.parse().unwrap()))
        };
        failpoint::wait_paused(&gate);
        assert_eq!(s.state(vid), "removing");
        let opener = {
            let s = s.clone();
            std::thread::spawn(move || s.fs.open(ino, libc::O_RDWR, &register, true).map(|o| o.fh))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!opener.is_finished(), "the open waits for the removal");
        failpoint::resume("pause.remove", vid, &gate);
        remover.join().unwrap().unwrap();
        assert_eq!(
            opener.join().unwrap().unwrap_err(),
            TryError::Errno(libc::ENOENT)
        );
        let left: Vec<String> = std::fs::read_dir(s.dir.path().join("pool/c/v"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec!["other.img".to_owned()], "nothing orphaned");
    }
}

/// After the session, a volume held by a writer outside reflinkfs keeps
/// [`ReflinkFs::wait_held`] (the daemon) waiting, and listed as waited
/// for, until the writer lets go; then it is committed with what that
/// writer wrote.
#[test]
fn wait_held_commits_a_held_volume_once_its_writer_lets_go() {
    let s = setup(&["c/v/a"], true);
    let fh = s.open("c/v/a-dirty.img", true).unwrap();
    assert_eq!(s.fs.write(fh, 0, b"mine").unwrap(), 4);
    let outside = std::fs::OpenOptions::new()
        .write(true)
        .open(s.dir.path().join("pool/c/v/a-dirty.img"))
        .unwrap();
    s.fs.release(fh);
    let end = Instant::now() + Duration::from_secs(30);
    while s.state("c/v/a") != "held" {
        assert!(Instant::now() < end, "c/v/a was not held");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(s.fs.waiting_for().is_empty(), "not before the session ends");
    s.fs.shutdown();
    assert_eq!(s.state("c/v/a"), "held", "the writer still has it");

    let fs = s.fs.clone();
    let waiter = std::thread::spawn(move || fs.wait_held());
    let vid: ValidVid = "c/v/a".parse().unwrap();
    while s.fs.waiting_for() != [vid.clone()] {
        assert!(Instant::now() < end, "the wait did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    outside.write_all_at(b"theirs", 4).unwrap();
    drop(outside);
    waiter.join().unwrap();
    assert_eq!(s.state("c/v/a"), "stopped");
    assert_eq!(s.committed("c/v/a", 0, 10), b"minetheirs");
    assert!(s.fs.waiting_for().is_empty());
}

/// The kernel may FORGET an inode as soon as the daemon has answered the
/// RELEASE of its last open (the adapter answers before it does the
/// release's work): the release must not put the forgotten inode back in
/// the table, nor leave its passthrough registration behind.
#[test]
fn a_release_after_forget_does_not_bring_the_inode_back() {
    let s = setup(&["c/v/a"], true);
    let fh = s.open("c/v/a-dirty.img", true).unwrap();
    s.fs.write(fh, 0, b"one").unwrap();
    s.fs.release(fh);
    s.wait_stopped("c/v/a");
    let before = s.fs.inode_count();
    let ino = s.fs.lookup(s.ino("c/v"), "a.img").unwrap().ino;
    let revision =
        s.fs.readdir(s.ino("c/v"))
            .unwrap()
            .into_iter()
            .find(|(_, _, n)| n.starts_with("a.img."))
            .map(|(_, _, n)| n)
            .expect("a revision");
    let rev_ino = s.fs.lookup(s.ino("c/v"), &revision).unwrap().ino;
    let fhs: Vec<u64> = [ino, rev_ino]
        .iter()
        .map(|i| s.fs.open(*i, libc::O_RDONLY, &register, false).unwrap().fh)
        .collect();
    assert_eq!(s.fs.ro_backing.lock().len(), 2);
    // The kernel forgets each (the lookup above and the one of `ino`),
    // then the release's work runs.
    s.fs.forget(ino, 2);
    s.fs.forget(rev_ino, 1);
    let forgotten = s.fs.inode_count();
    for fh in fhs {
        s.fs.release(fh);
    }
    assert_eq!(s.fs.inode_count(), forgotten, "no inode came back");
    assert!(s.fs.node(ino).is_err() && s.fs.node(rev_ino).is_err());
    assert!(s.fs.ro_backing.lock().is_empty(), "no registration is left");
    assert!(
        forgotten <= before + 1,
        "{forgotten} inodes, {before} before"
    );
}
