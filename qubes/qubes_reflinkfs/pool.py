"""The pool: options, setup, the mount, and the volumes qubesd knows."""

import ctypes
import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import threading
import time
import weakref

import qubes.storage

from . import control
from .control import QUICK_TIMEOUT, REQUEST_TIMEOUT
from .errors import ReflinkfsError, wrap
from .props import as_bool, pushed
from .threads import in_thread
from .volume import ReflinkfsVolume

log = logging.getLogger("qubes.storage.reflinkfs")

#: The dom0 file that names the reflinkfs binary (`REFLINKFS=/path`); only
#: root may write it. The binary is never a pool option: qubesd runs it as
#: root, and whoever may add a pool must not choose it.
CONFIG_FILE = "/etc/reflinkfs/qubes-driver.conf"
#: Where the binary is looked for when the config file does not name one.
DEFAULT_BINARIES = ("/usr/local/bin/reflinkfs", "/usr/bin/reflinkfs")
#: The mounts this driver made (one small JSON file each), so that the
#: mount of a pool qubesd removed is unmounted later. On tmpfs: a reboot
#: ends the mounts and the record together.
STATE_DIR = "/run/qubes-reflinkfs/driver"

#: Seconds `reflinkfs mount` and `unmount` may take.
MOUNT_TIMEOUT = 300

#: The errnos of a mount whose FUSE daemon is gone.
STALE = (errno.ENOTCONN, errno.ECONNABORTED)

# The pools of this process, to find the mounts no pool uses any more.
_live_pools = weakref.WeakSet()
_sweep_lock = threading.Lock()
_swept = False


def reflinkfs_binary():
    """The reflinkfs binary: the one CONFIG_FILE names, else the first of
    DEFAULT_BINARIES. Both the file and the binary must be root's and
    writable by nobody else."""
    path = None
    try:
        fd = os.open(CONFIG_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError as e:
        raise ReflinkfsError("cannot read {}: {}".format(CONFIG_FILE, e)) from e
    if fd is not None:
        with os.fdopen(fd) as f:
            _check_root_only(os.fstat(f.fileno()), CONFIG_FILE)
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key.strip() == "REFLINKFS":
                    path = value.strip().strip('"')
        if path is None:
            raise ReflinkfsError("{} has no line REFLINKFS=/path/to/reflinkfs".format(
                CONFIG_FILE))
        candidates = (path,)
    else:
        candidates = DEFAULT_BINARIES
    for path in candidates:
        if not os.path.isabs(path):
            raise ReflinkfsError("{}: the binary must be an absolute path, not {!r}".format(
                CONFIG_FILE, path))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        _check_root_only(st, path)
        return path
    raise ReflinkfsError("no reflinkfs binary at {} (install it there, or name it in {})".format(
        " or ".join(candidates), CONFIG_FILE))


def _check_root_only(st, path):
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ReflinkfsError(
            "{} must belong to root and be writable by root only (it is uid {}, "
            "mode {:o}); not using it".format(path, st.st_uid, stat.S_IMODE(st.st_mode)))


def _lazy_unmount(path):
    """umount2(path, MNT_DETACH): the mount is gone from the tree at once,
    whatever still holds it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _is_stale(path):
    try:
        os.stat(path)
    except OSError as e:
        return e.errno in STALE
    return False


def _reflinkfs_mounts(dir_path):
    """The mountpoints of /proc/self/mountinfo whose source is `dir_path`
    and whose type is a reflinkfs FUSE mount."""
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if " - " not in line:
                    continue
                tail = line.split(" - ", 1)[1].split()
                if len(tail) >= 2 and tail[0] == "fuse.reflinkfs" and \
                        _unescape(tail[1]) == dir_path:
                    found.append(_unescape(fields[4]))
    except OSError:
        pass
    return found


def _unescape(s):
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


class ReflinkfsPool(qubes.storage.Pool):
    """A reflinkfs pool: `dir_path` holds it, `mountpoint` shows it.

    Options (`qvm-pool add NAME reflinkfs -o KEY=VALUE,...`):
    - `dir_path`: the pool directory (made and initialised by setup);
    - `mountpoint`: where the pool is mounted when the driver mounts it
      (default /run/qubes-reflinkfs/NAME); a pool already mounted elsewhere
      (by the systemd unit) is used where it is;
    - `setup_check`: `False` makes a copy-mode pool on a filesystem without
      reflinks (every start is then a full copy);
    - `stop_timeout`: seconds a stop waits for the VM's loop device to let
      go of the volume before it fails (default 60);
    - `attach`: `True` (default) gives Xen a loop device reflinkfs puts
      straight on the volume's image (`volume attach`: no FUSE in the data
      path, native speed on every kernel); `False` gives it the mount's
      NAME-dirty.img, which Xen's block script puts a loop device on;
    - `revisions_to_keep`, `ephemeral_volatile`: as for every pool.

    The binary is not an option: it comes from CONFIG_FILE or a fixed
    place (`reflinkfs_binary`). A qubes.xml written by an older driver may
    still carry `reflinkfs=`: it is ignored there, and refused by setup
    (`qvm-pool add`).
    """

    driver = "reflinkfs"

    def __init__(self, *, name, dir_path, mountpoint=None, setup_check=True, stop_timeout=60,
                 attach=True, revisions_to_keep=1, ephemeral_volatile=False, **kwargs):
        self._ready = False
        self._revisions_to_keep = int(revisions_to_keep)
        super().__init__(name=name, revisions_to_keep=int(revisions_to_keep),
                         ephemeral_volatile=as_bool(ephemeral_volatile))
        self._refused = sorted(kwargs)
        unknown = [k for k in self._refused if k != "reflinkfs"]
        if unknown:
            raise ReflinkfsError("pool {}: unknown option {}".format(name, ", ".join(unknown)))
        if "reflinkfs" in kwargs:
            log.warning("pool %s: ignoring the option reflinkfs=%s: the binary comes from %s",
                        name, kwargs["reflinkfs"], CONFIG_FILE)
        self.dir_path = os.path.abspath(str(dir_path))
        self.mountpoint = str(mountpoint) if mountpoint else \
            os.path.join("/run/qubes-reflinkfs", name)
        self.setup_check = as_bool(setup_check)
        self.stop_timeout = float(stop_timeout)
        self.attach = as_bool(attach)
        self._volumes = {}
        self._mount_lock = threading.Lock()
        # Where the pool is mounted, once seen (None: not known yet).
        self._mounted_at = None
        _live_pools.add(self)
        self._ready = True

    @property
    def reflinkfs(self):
        return reflinkfs_binary()

    # -- qubesd's properties -------------------------------------------

    @property
    def config(self):
        return {
            "name": self.name,
            "driver": self.driver,
            "dir_path": self.dir_path,
            "mountpoint": self.mountpoint,
            "setup_check": str(self.setup_check),
            "stop_timeout": str(self.stop_timeout),
            "attach": str(self.attach),
            "revisions_to_keep": str(self.revisions_to_keep),
            "ephemeral_volatile": str(self.ephemeral_volatile),
        }

    # qubesd sets it after construction (`qvm-pool set`): the pool's own
    # default follows, so that volumes made outside qubesd agree.
    # On qubesd's loop: a short request, and none while the pool is not
    # mounted (qubesd gives every new volume its revisions_to_keep anyway).
    revisions_to_keep = pushed(
        "_revisions_to_keep", int,
        lambda p, n: p._set_quietly("revisions_to_keep", str(n)))

    def _set_quietly(self, prop, value):
        try:
            self.call("pool_set", property=prop, value=value, timeout=QUICK_TIMEOUT,
                      mount=False)
        except ReflinkfsError as e:
            if e.cause != "not-mounted":
                raise
            log.info("pool %s: not mounted; reflinkfs's %s stays as it is", self.name, prop)

    # The filesystem's numbers, from the pool directory (never the mount:
    # it may be stale, and reading it must never mount anything).
    def _statvfs(self):
        try:
            return os.statvfs(self.dir_path)
        except OSError:
            return None

    @property
    def size(self):
        st = self._statvfs()
        return st.f_blocks * st.f_frsize if st else None

    @property
    def usage(self):
        st = self._statvfs()
        return (st.f_blocks - st.f_bfree) * st.f_frsize if st else None

    @property
    def usage_details(self):
        details = {}
        st = self._statvfs()
        if st:
            details["data_size"] = st.f_blocks * st.f_frsize
            details["data_usage"] = (st.f_blocks - st.f_bfree) * st.f_frsize
        return details

    def included_in(self, app):
        """The pool whose directory holds this one's (its space is theirs)."""
        search = getattr(qubes.storage, "search_pool_containing_dir", None)
        if search is None:
            return None
        others = [p for p in app.pools.values() if p is not self]
        return search(others, self.dir_path)

    # -- setup and teardown --------------------------------------------

    async def setup(self):
        await in_thread(self._setup)

    def _setup(self):
        if self._refused:
            raise ReflinkfsError(
                "pool {}: the option reflinkfs is refused: qubesd would run that path as "
                "root; the binary comes from {} or {}".format(
                    self.name, CONFIG_FILE, " or ".join(DEFAULT_BINARIES)))
        try:
            os.makedirs(self.dir_path, exist_ok=True)
            initialised = os.path.exists(os.path.join(self.dir_path, ".reflinkfs", "pool.json"))
        except OSError as e:
            raise wrap(e, "pool {}: {}".format(self.name, self.dir_path)) from e
        if not initialised:
            args = ["pool", "init", "--pool", self.dir_path,
                    "--revisions-to-keep", str(self.revisions_to_keep)]
            if not self.setup_check:
                args.append("--setup-check=no")
            self._run(args)
        self.ensure_mounted()

    async def destroy(self):
        """Qubes before 4.2 calls this when it removes a pool (once no
        volume is in it): unmount, and keep the data (as the file drivers
        do). Later releases do not call it; `sweep_unused_mounts` then
        unmounts what this driver mounted."""
        await in_thread(self._destroy)

    def _destroy(self):
        try:
            status = control.request(self.dir_path, "status", timeout=QUICK_TIMEOUT)
        except control.NotMounted:
            _forget_mount(self.dir_path)
            return
        except (control.ControlError, OSError) as e:
            raise wrap(e, "pool {}".format(self.name)) from e
        if status.get("mountpoint"):
            self._run(["unmount", status["mountpoint"]])
        _forget_mount(self.dir_path)
        self._mounted_at = None

    # -- volumes -------------------------------------------------------

    def init_volume(self, vm, volume_config):
        sweep_unused_mounts_once()
        config = dict(volume_config)
        config["pool"] = self
        config.setdefault("revisions_to_keep", self.revisions_to_keep)
        if not config.get("vid"):
            config["vid"] = "{}/{}/{}".format(vm.dir_path_prefix, vm.name, config["name"])
        volume = ReflinkfsVolume(**config)
        # A second init of a vid (qubesd re-initialises a VM's root with
        # its new template as source) replaces the object; reflinkfs hears
        # of the new source at the volume's next start, or when the old
        # source is removed.
        self._volumes[volume.vid] = volume
        return volume

    def list_volumes(self):
        return list(self._volumes.values())

    def get_volume(self, vid):
        return self._volumes[vid]

    def forget_volume(self, vid):
        self._volumes.pop(vid, None)

    # -- the daemon ----------------------------------------------------

    def _run(self, args, timeout=MOUNT_TIMEOUT):
        """Runs the reflinkfs CLI (init, mount, unmount only: everything
        else goes through the socket)."""
        cmd = [reflinkfs_binary()] + args
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as e:
            raise ReflinkfsError("pool {}: {} took longer than {} s".format(
                self.name, " ".join(cmd), timeout), kind="io", cause="timed-out") from e
        except OSError as e:
            raise wrap(e, "pool {}: cannot run {}".format(self.name, cmd[0])) from e
        if done.returncode != 0:
            lines = [l for l in done.stderr.splitlines() if l.strip()]
            raise ReflinkfsError("pool {}: {}".format(
                self.name, lines[-1] if lines else "{} failed with status {}".format(
                    " ".join(cmd), done.returncode)), kind=_KIND_OF_STATUS.get(done.returncode))
        return done.stdout

    def _status(self, timeout=QUICK_TIMEOUT):
        return control.request(self.dir_path, "status", timeout=timeout)

    def ensure_mounted(self):
        """Mounts the pool on `mountpoint` unless its daemon runs; gives
        where it is mounted. A mount left by a daemon that died (stale:
        ENOTCONN) is lazily unmounted first; the new mount runs recovery."""
        try:
            try:
                return self._mountpoint_of(self._status(REQUEST_TIMEOUT))
            except control.NotMounted:
                pass
            with self._mount_lock:
                try:
                    return self._mountpoint_of(self._status(REQUEST_TIMEOUT))
                except control.NotMounted:
                    pass
                self._clear_stale_mounts()
                os.makedirs(self.mountpoint, exist_ok=True)
                log.info("pool %s: mounting %s on %s", self.name, self.dir_path, self.mountpoint)
                self._run(["mount", self.dir_path, self.mountpoint])
                _record_mount(self.name, self.dir_path, self.mountpoint)
                return self._mountpoint_of(self._status(REQUEST_TIMEOUT))
        except qubes.storage.StoragePoolException:
            raise
        except control.NotMounted:
            raise ReflinkfsError("pool {}: mounted, but its daemon does not answer".format(
                self.name)) from None
        except Exception as e:  # pylint: disable=broad-except
            raise wrap(e, "pool {}: mounting {}".format(self.name, self.mountpoint)) from e

    def _clear_stale_mounts(self):
        """Lazily unmounts every mount of this pool whose daemon is gone,
        and a dead mount on `mountpoint`."""
        places = set(_reflinkfs_mounts(self.dir_path))
        places.add(self.mountpoint)
        if self._mounted_at:
            places.add(self._mounted_at)
        for place in sorted(places):
            if _is_stale(place):
                log.warning("pool %s: %s is a mount whose daemon is gone; unmounting it "
                            "lazily and mounting the pool again", self.name, place)
                _lazy_unmount(place)
        self._mounted_at = None

    def attached_device(self, vid, timeout=REQUEST_TIMEOUT, mount=True):
        """The loop device `volume attach` has on `vid`, if any."""
        status = self.call("status", timeout=timeout, mount=mount)
        for a in status.get("attached", []):
            if a["vid"] == vid:
                return a["device"]
        return None

    def _mountpoint_of(self, status):
        where = status.get("mountpoint")
        if not where and status.get("waiting_for"):
            # (protocol 1.3) Unmounted; the daemon exits once it has
            # committed these volumes, which something still writes.
            raise qubes.storage.StoragePoolException(
                "pool {}: its daemon serves no mount (unmounted from {}); it exits once it "
                "has committed {}, still open for writing outside reflinkfs: detach that "
                "writer and start the VM again".format(self.name, status.get("detached_from"),
                                                       ", ".join(status["waiting_for"])))
        if not where:
            raise ReflinkfsError(
                "pool {}: its daemon serves no mount (lazily unmounted from {}); "
                "unmount it and start the VM again".format(self.name,
                                                          status.get("detached_from")))
        self._mounted_at = where
        return where

    @property
    def mounted_at(self):
        """Where the pool is mounted (mounting it if it is not)."""
        if self._mounted_at is None or not os.path.ismount(self._mounted_at):
            return self.ensure_mounted()
        return self._mounted_at

    @property
    def known_mountpoint(self):
        """Where the pool is, or will be, mounted, without asking anyone."""
        return self._mounted_at or self.mountpoint

    def call(self, op, fd=None, timeout=REQUEST_TIMEOUT, mount=True, **fields):
        """One request to the pool's daemon, mounting the pool first if
        needed (unless `mount` is false); every failure is a ReflinkfsError
        (a StoragePoolException, as qubesd expects) with reflinkfs's
        one-line message, its kind and its cause."""
        sweep_unused_mounts_once()
        for attempt in (1, 2):
            try:
                return control.request(self.dir_path, op, fd=fd, timeout=timeout, **fields)
            except (ConnectionResetError, BrokenPipeError) as e:
                # Seen once while a new daemon started on a stale mount's
                # pool: a connection dropped unanswered. Only a request that
                # changes nothing is safe to send again.
                if attempt == 2 or op not in READ_ONLY_OPS:
                    raise wrap(e, "pool {}: talking to its daemon".format(self.name)) from e
                log.info("pool %s: %s: %s; asking again", self.name, op, e)
                time.sleep(0.1)
            except control.NotMounted:
                if attempt == 2 or not mount:
                    raise ReflinkfsError("pool {}: not mounted".format(self.name),
                                         kind="io", cause="not-mounted") from None
                self.ensure_mounted()
            except qubes.storage.StoragePoolException:
                raise
            except Exception as e:  # pylint: disable=broad-except
                raise wrap(e, "pool {}: talking to its daemon".format(self.name)) from e
        raise AssertionError("unreachable")


# The requests that change nothing (sent again after a dropped connection).
READ_ONLY_OPS = ("status", "pool_info", "volume_info", "volume_list", "volume_revisions")

# The CLI's exit statuses (doc/CONTROL.md), for the kind of a failed run.
_KIND_OF_STATUS = {1: "io", 3: "invalid-input", 4: "not-found", 5: "busy", 6: "refused",
                   7: "no-space", 8: "corrupt", 9: "unsupported", 10: "exists",
                   11: "protocol"}


# -- the mounts this driver made ---------------------------------------------

def _record_path(dir_path):
    return os.path.join(STATE_DIR, hashlib.sha256(dir_path.encode()).hexdigest()[:32] + ".json")


def _record_mount(name, dir_path, mountpoint):
    try:
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        tmp = _record_path(dir_path) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pool": name, "dir_path": dir_path, "mountpoint": mountpoint}, f)
        os.replace(tmp, _record_path(dir_path))
    except OSError as e:
        log.warning("pool %s: cannot record its mount in %s: %s", name, STATE_DIR, e)


def _forget_mount(dir_path):
    try:
        os.remove(_record_path(dir_path))
    except OSError:
        pass


def recorded_mounts():
    """The mounts this driver made (and has not unmounted): dicts with
    `pool`, `dir_path`, `mountpoint`."""
    found = []
    try:
        names = sorted(os.listdir(STATE_DIR))
    except OSError:
        return found
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(STATE_DIR, name)) as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            continue
    return found


def sweep_unused_mounts(used_dirs=None):
    """Unmounts the mounts this driver made of pools no pool of qubesd
    uses any more (Qubes 4.2+ removes a pool without calling destroy()).
    `used_dirs`: the dir_paths of qubesd's pools; default: those of this
    process's live pools. A mount that still has volumes running or
    attached is kept. Gives the mountpoints unmounted."""
    if used_dirs is None:
        used_dirs = {p.dir_path for p in list(_live_pools)}
    done = []
    for rec in recorded_mounts():
        dir_path = rec.get("dir_path")
        if not dir_path or dir_path in used_dirs:
            continue
        try:
            status = control.request(dir_path, "status", timeout=QUICK_TIMEOUT)
        except control.NotMounted:
            _forget_mount(dir_path)
            continue
        except Exception as e:  # pylint: disable=broad-except
            log.warning("pool %s: no pool uses %s any more, but its daemon does not answer: %s",
                        rec.get("pool"), dir_path, e)
            continue
        if status.get("running") or status.get("attached") or not status.get("mountpoint"):
            log.info("pool %s: no pool uses %s any more; its mount stays while volumes of "
                     "it run", rec.get("pool"), dir_path)
            continue
        try:
            subprocess.run([reflinkfs_binary(), "unmount", status["mountpoint"]],
                           capture_output=True, timeout=MOUNT_TIMEOUT, check=True,
                           stdin=subprocess.DEVNULL)
        except Exception as e:  # pylint: disable=broad-except
            log.warning("pool %s: unmounting %s, which no pool uses any more: %s",
                        rec.get("pool"), status["mountpoint"], e)
            continue
        log.info("pool %s: unmounted %s, which no pool uses any more", rec.get("pool"),
                 status["mountpoint"])
        _forget_mount(dir_path)
        done.append(status["mountpoint"])
    return done


def sweep_unused_mounts_once():
    """The sweep, once per process (qubesd's start), in a thread of its
    own: the first driver call of a qubesd comes once every pool of
    qubes.xml is built, so the pools alive then are all there are."""
    global _swept  # pylint: disable=global-statement
    with _sweep_lock:
        if _swept:
            return
        _swept = True
    if recorded_mounts():
        threading.Thread(target=_sweep_logged, name="reflinkfs-sweep", daemon=True).start()


def _sweep_logged():
    try:
        sweep_unused_mounts()
    except Exception:  # pylint: disable=broad-except
        log.exception("sweeping the mounts no pool uses")
