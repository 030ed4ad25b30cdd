//! Helpers for tests that mount pools for real: the daemon, loop devices,
//! filesystems inside volumes, xattrs, and waiting for commits. Every guard
//! cleans up in `Drop`, so a failing test leaves no mount or loop device.

use super::{new_pool_with, TestFs};
use reflinkfs::engine::Pool;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The built `reflinkfs` binary.
pub fn bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("reflinkfs")
}

/// Runs a command, returning its output; panics if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Requires root and a tool, failing loudly in CI and skipping (with a
/// message) elsewhere. Returns whether the test can go on.
pub fn require(tools: &[&str]) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if root && missing.is_empty() {
        return true;
    }
    let why = if root {
        format!("missing tools: {missing:?}")
    } else {
        "not root".to_owned()
    };
    assert!(!ci, "CI=true but this mount test cannot run: {why}");
    eprintln!("SKIPPING (not in CI): {why}");
    false
}

/// The filesystems a test that mounts runs on: all of them if it can run
/// (see [`require`]), none if not.
pub fn mount_filesystems(tools: &[&str]) -> Vec<TestFs> {
    if require(tools) {
        super::filesystems()
    } else {
        Vec::new()
    }
}

/// Polls `cond` every 20 ms until it holds, or panics after `secs`.
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads an xattr, `None` when absent.
pub fn xattr(path: &Path, name: &str) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a writable buffer of the given length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(String::from_utf8(buf).unwrap())
}

/// Opens a file for reading and writing.
pub fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

/// Why opening `p` for reading and writing fails, which it must.
pub fn open_rw_error(p: &Path) -> std::io::Error {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .expect_err("the open must fail")
}

/// The daemon's log of the pool at `pool`.
pub fn daemon_log(pool: &Path) -> String {
    std::fs::read_to_string(pool.join(".reflinkfs/daemon.log")).unwrap_or_default()
}

/// A new pool on `fs`, keeping `keep` revisions by default, with the
/// volumes `setup` makes; returns its path, the pool closed again (a
/// mount's daemon takes its lock).
pub fn prepared_pool(fs: &TestFs, test: &str, keep: i64, setup: impl FnOnce(&Pool)) -> PathBuf {
    let (pool, path) = new_pool_with(fs, test, keep);
    setup(&pool);
    path
}

/// A mounted pool. Unmounts (and, if it must, kills the daemon) on drop.
pub struct Mounted {
    pub pool: PathBuf,
    pub mnt: PathBuf,
    done: bool,
}

impl Mounted {
    /// `reflinkfs mount POOL MNT -o OPTS`; the mountpoint is created.
    pub fn mount(pool: &Path, mnt: &Path, opts: &str) -> Mounted {
        Mounted::mount_with(pool, mnt, opts, &[])
    }

    /// [`Mounted::mount`] with `env` in the daemon's environment.
    pub fn mount_with(pool: &Path, mnt: &Path, opts: &str, env: &[(&str, &str)]) -> Mounted {
        std::fs::create_dir_all(mnt).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("mount").arg(pool).arg(mnt);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        cmd.envs(env.iter().copied());
        run_ok(&mut cmd);
        Mounted::adopt(pool, mnt)
    }

    /// [`Mounted::mount`] at `mnt` beside the pool.
    pub fn beside(pool: &Path, opts: &str) -> Mounted {
        Mounted::mount(pool, &pool.parent().unwrap().join("mnt"), opts)
    }

    /// A guard for a mount made some other way (mount(8), fstab).
    pub fn adopt(pool: &Path, mnt: &Path) -> Mounted {
        Mounted {
            pool: pool.to_owned(),
            mnt: mnt.to_owned(),
            done: false,
        }
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The daemon's PID, from the pool's lock file.
    pub fn daemon_pid(&self) -> i32 {
        std::fs::read_to_string(self.pool.join(".reflinkfs/lock"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn root_counter(&self, name: &str) -> u64 {
        xattr(&self.mnt, &format!("user.reflinkfs.{name}"))
            .unwrap_or_else(|| panic!("no xattr {name} on {}", self.mnt.display()))
            .parse()
            .unwrap()
    }

    /// Waits until the volume behind `rel` (a `-dirty.img`) is stopped:
    /// its last release was handled and the commit is done.
    pub fn wait_stopped(&self, rel: &str) {
        let p = self.path(rel);
        wait_for(&format!("{rel} to stop"), 60, || {
            xattr(&p, "user.reflinkfs.state").as_deref() == Some("stopped")
        });
    }

    /// Writes `data` at `off` of `rel` through the mount and closes it,
    /// then waits for the commit.
    pub fn write_and_close(&self, rel: &str, off: u64, data: &[u8]) {
        let f = open_rw(&self.path(rel));
        f.write_all_at(data, off).unwrap();
        drop(f);
        self.wait_stopped(rel);
    }

    /// Kills the daemon with SIGKILL and waits until it is gone.
    pub fn kill_daemon(&self) {
        let pid = self.daemon_pid();
        // SAFETY: sending a signal has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        wait_for("the daemon to die", 30, || {
            !reflinkfs::sys::process_running(pid as u32)
        });
    }

    /// `reflinkfs unmount`, which must succeed and return only once the
    /// daemon has exited (so the filesystem under the pool can go next).
    pub fn unmount(mut self) {
        let pid = self.daemon_pid();
        run_ok(Command::new(bin()).arg("unmount").arg(&self.mnt));
        self.done = true;
        assert!(
            !reflinkfs::sys::process_running(pid as u32),
            "reflinkfs unmount returned while its daemon (process {pid}) still runs"
        );
    }

    /// Aborts the mount's FUSE connection (through fusectl), which frees
    /// every process stuck on a request the daemon never answers: a test
    /// that finds a hang calls it before it fails, so nothing is left in D
    /// state. `dev` is the mount's st_dev, taken while it still answered.
    pub fn abort_connection(dev: u64) {
        let conns = Path::new("/sys/fs/fuse/connections");
        let mounted = std::fs::read_to_string("/proc/mounts")
            .is_ok_and(|m| m.lines().any(|l| l.contains(" /sys/fs/fuse/connections ")));
        if !mounted {
            let _ = Command::new("mount")
                .args(["-t", "fusectl", "none"])
                .arg(conns)
                .status();
        }
        let minor = libc::minor(dev);
        let _ = std::fs::write(conns.join(minor.to_string()).join("abort"), "1");
    }

    /// The mount's st_dev, for [`Mounted::abort_connection`].
    pub fn dev(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.mnt).unwrap().dev()
    }

    /// Marks the mount as gone (the test unmounted it some other way).
    pub fn forget(mut self) {
        self.done = true;
    }

    /// Marks the mount as one whose daemon is gone (killed, or aborted by
    /// `umount -f`): the guard returned unmounts it lazily.
    pub fn dead(mut self) -> DeadMount {
        self.done = true;
        DeadMount(self.mnt.clone())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let pid = std::fs::read_to_string(self.pool.join(".reflinkfs/lock")).ok();
        let ok = Command::new(bin())
            .arg("unmount")
            .arg(&self.mnt)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            if let Some(pid) = pid.and_then(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: sending a signal to a PID has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A mountpoint whose daemon is gone (killed, or aborted by `umount -f`):
/// lazily unmounted on drop, so a failing test leaves no dead mount.
pub struct DeadMount(pub PathBuf);

impl Drop for DeadMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A page-aligned buffer, for O_DIRECT writes.
pub struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, len }
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to len bytes this struct owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// A loop device attached to a file. Detached on drop.
pub struct Loop {
    pub dev: String,
    /// The file, as the kernel names it in sysfs.
    backing: String,
    done: bool,
}

impl Loop {
    pub fn attach(file: &Path, direct_io: bool, sector_size: Option<u32>) -> Loop {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        if let Some(s) = sector_size {
            cmd.args(["--sector-size", &s.to_string()]);
        }
        cmd.arg(file);
        let dev = run_ok(&mut cmd).trim().to_owned();
        let backing = std::fs::canonicalize(file)
            .unwrap_or_else(|_| file.to_owned())
            .to_string_lossy()
            .into_owned();
        Loop {
            dev,
            backing,
            done: false,
        }
    }

    pub fn detach(mut self) {
        run_ok(Command::new("losetup").args(["-d", &self.dev]));
        self.done = true;
        // losetup -d is asynchronous: wait until the device lets go of the
        // file, so that the volume's last release follows. Once it has, its
        // number may at once go to another test's device: wait for it to
        // be bound to something else than this file, not for it to be free.
        let name = self.dev.trim_start_matches("/dev/").to_owned();
        wait_for(&format!("{} to detach", self.dev), 30, || {
            std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                .map_or(true, |b| b.trim_end_matches('\n') != self.backing)
        });
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if !self.done {
            let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        }
    }
}

/// A filesystem mounted from a block device. Unmounted on drop.
pub struct BlockMount {
    pub dir: PathBuf,
    done: bool,
}

impl BlockMount {
    pub fn mount(dev: &str, dir: &Path) -> BlockMount {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(Command::new("mount").arg(dev).arg(dir));
        BlockMount {
            dir: dir.to_owned(),
            done: false,
        }
    }

    pub fn unmount(mut self) {
        run_ok(Command::new("umount").arg(&self.dir));
        self.done = true;
    }

    /// Marks the filesystem as unmounted (the test did it some other way).
    pub fn forget(mut self) {
        self.done = true;
    }
}

impl Drop for BlockMount {
    fn drop(&mut self) {
        if !self.done {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Bytes allocated to a file on its filesystem.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}
