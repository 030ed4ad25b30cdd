"""Real VMs on reflinkfs volumes: the guest (tests/vm/build-guest), jobs
run in it, qemu processes, pools, and the two ways a hypervisor gets a
volume's disk (a file on the mount, or a loop device from `volume attach`).

Every resource made here is registered with a `Cleanup`, which the tests'
fixtures run in a `finally`: qemu processes are killed, attached volumes
detached, loop devices released, mounts unmounted, whatever failed.

In CI (CI=true) a missing capability is a failure, never a skip.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(CHECKOUT, "tests", "pylib"))

from testenv import binary, missing, require, scratch_xfs_from_env  # noqa: E402,F401

MIB = 1 << 20

# Generous bounds against hangs, never assertions of speed: an emulated
# guest on a busy 2-core machine may take minutes.
BOOT_TIMEOUT = 600
IDLE_TIMEOUT = 120
# A KVM guest that boots prints its job's end within seconds; here a stock
# kernel under nested KVM never prints anything.
KVM_PROBE_TIMEOUT = 20
TCG_PROBE_TIMEOUT = 180

MARK = "@@@ "
# Enough for reflinkfs or fio with their libraries, run from the job disk.
GUEST_MEMORY_MIB = 1024
GUEST_CPUS = 2


def log(msg):
    print("vm: " + msg, flush=True)


def scratch_xfs():
    path = scratch_xfs_from_env()
    if path is None:
        missing("REFLINKFS_TEST_FS names no xfs (format xfs=/path,btrfs=/path,ext4=/path)")
    return path


def run(cmd, check=True):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError("{} exited {}: {}{}".format(
            " ".join(cmd), out.returncode, out.stdout, out.stderr))
    return out


class Cleanup:
    """Undo actions, run last-in first-out; each one runs even when an
    earlier one fails, and the failures are printed, not raised, so that
    the test's own failure is the one reported."""

    def __init__(self):
        self.actions = []

    def add(self, what, action):
        self.actions.append((what, action))

    def run(self):
        while self.actions:
            what, action = self.actions.pop()
            try:
                action()
            except Exception as e:  # keep undoing the rest
                print("cleanup of {}: {}".format(what, e))


# ---------------------------------------------------------------- the guest

class Guest:
    """The kernel and initramfs of build-guest, and the accelerator that
    boots them here."""

    def __init__(self, directory):
        self.kernel = os.path.join(directory, "vmlinuz")
        self.initrd = os.path.join(directory, "initrd")
        with open(os.path.join(directory, "kernel-version")) as f:
            self.kernel_version = f.read().strip()
        self.accel = None

    @staticmethod
    def build():
        require("qemu-system-x86_64", "busybox", "apt-cache", "dpkg-deb", "mke2fs")
        out = subprocess.run(["bash", os.path.join(HERE, "build-guest")],
                             stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            pytest.fail("tests/vm/build-guest failed (its messages are above)")
        return Guest(out.stdout.strip().splitlines()[-1])

    def qemu_accel_args(self):
        if self.accel == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]

    def choose_accel(self):
        """KVM when a guest really boots with it, else TCG, which must boot
        then. A boot probe, not a look at /dev/kvm: here /dev/kvm exists,
        but a stock kernel hangs under it (nested kvm_pvm).
        REFLINKFS_VM_ACCEL=kvm|tcg skips the probe."""
        forced = os.environ.get("REFLINKFS_VM_ACCEL")
        if forced in ("kvm", "tcg"):
            self.accel = forced
            log("accelerator {} (REFLINKFS_VM_ACCEL)".format(forced))
            return
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            log("no usable /dev/kvm")
        elif self.probe("kvm", KVM_PROBE_TIMEOUT) is not None:
            log("accelerator kvm: the probe guest booted")
            return
        outcome = self.probe("tcg", TCG_PROBE_TIMEOUT)
        if outcome is None:
            pytest.fail("the guest boots neither with KVM nor with TCG (see the console above)")
        log("accelerator tcg (emulated CPU: -accel tcg,thread=multi -cpu max)")

    def probe(self, accel, timeout):
        """Boots a job that only answers; the outcome, or None."""
        self.accel = accel
        cleanup = Cleanup()
        try:
            vm = VM(self, Job("result probe ok"), {}, cleanup)
            outcome = vm.wait(timeout=timeout, fail=False)
            if outcome is None or outcome.results.get("probe") != "ok":
                log("the probe guest did not boot with {} within {} s:\n{}".format(
                    accel, timeout, Outcome(vm.console()).tail()))
                return None
            if MARK + "insmod" in outcome.console:
                pytest.fail("the guest could not load its modules:\n" + outcome.tail())
            return outcome
        finally:
            cleanup.run()


# Functions every job has, on the job disk as lib.sh.
JOB_LIB = r"""
set -eu
# result KEY VALUE: a line the host parses.
result() { echo "@@@ result $1 $2"; }
# wait_host WORD: tell the host we wait, then wait until it sends WORD on
# the second serial port. The port is opened before the line is printed, so
# nothing the host sends is lost.
wait_host() {
    [ -e /proc/self/fd/7 ] || { exec 7</dev/ttyS1; stty -echo -icrnl <&7; }
    echo "@@@ wait $1"
    while read -r word <&7; do
        [ "$word" = "$1" ] && return 0
    done
    return 1
}
"""


class Job:
    """A shell script for the guest, with the host tools it needs (`tools`:
    commands on PATH, copied to their host paths) and other host files
    (`files`: guest path -> host path); executables come with the shared
    libraries ldd names."""

    def __init__(self, script, tools=(), files=None):
        self.script = script
        self.tools = tools
        self.files = files or {}

    def disk(self, directory):
        """The job as an ext2 image (the guest's /job)."""
        tree = os.path.join(directory, "job")
        root = os.path.join(tree, "root")
        os.makedirs(root)
        with open(os.path.join(tree, "lib.sh"), "w") as f:
            f.write(JOB_LIB)
        with open(os.path.join(tree, "job.sh"), "w") as f:
            f.write(self.script + "\n")
        copies = dict(self.files)
        for tool in self.tools:
            path = shutil.which(tool)
            if path is None:
                missing("{} is missing (the guest's job needs it)".format(tool))
            # /sbin/losetup is /usr/sbin/losetup (merged /usr), and the
            # guest's own /sbin is busybox's: the real directory, but the
            # tool's own name (mkfs.ext4 is mke2fs making ext4).
            path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
            copies[path] = path
        for host_path in list(copies.values()):
            for lib in shared_libraries(host_path):
                copies[lib] = lib
        size = 16 * MIB
        for guest_path, host_path in copies.items():
            dest = os.path.join(root, guest_path.lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(host_path, dest)  # follows symlinks: mkfs.ext4 stays mkfs.ext4
            size += os.path.getsize(dest) + 64 * 1024
        image = os.path.join(directory, "job.img")
        run(["mke2fs", "-q", "-F", "-t", "ext2", "-d", tree, image, str(size // 1024 * 5 // 4) + "k"])
        shutil.rmtree(tree)
        return image


def shared_libraries(path):
    """The shared libraries a dynamic executable loads, the dynamic loader
    included, as ldd resolves them on the host."""
    out = run(["ldd", path], check=False)
    if out.returncode != 0:  # a static executable
        return []
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


class Outcome:
    """What a guest printed: its job's exit status, its `result` lines, and
    the whole console."""

    def __init__(self, console):
        self.console = console
        self.rc = None
        self.results = {}
        for line in console.splitlines():
            line = line.strip()
            if line.startswith(MARK + "result "):
                _, _, key, value = (line.split(" ", 3) + [""])[:4]
                self.results[key] = value
            m = re.match(re.escape(MARK) + r"job end rc=(\d+)", line)
            if m:
                self.rc = int(m.group(1))

    def __getitem__(self, key):
        assert key in self.results, "the guest printed no result {}:\n{}".format(key, self.tail())
        return self.results[key]

    def tail(self, lines=60):
        return "\n".join(self.console.splitlines()[-lines:])


class VM:
    """One qemu process: the guest booting `job`, with `disks` (serial ->
    path of a raw file or block device) as virtio disks, opened the way
    libvirt opens a raw disk (cache=none, aio=io_uring), with
    discard=unmap so that the guest's discards reach the file, as with
    libvirt's <driver discard='unmap'/>."""

    def __init__(self, guest, job, disks, cleanup):
        self.dir = tempfile.mkdtemp(prefix="reflinkfs-vm-")
        cleanup.add("VM directory " + self.dir, lambda: shutil.rmtree(self.dir, ignore_errors=True))
        self.console_path = os.path.join(self.dir, "console.log")
        self.qemu_log_path = os.path.join(self.dir, "qemu.log")
        self.control_path = os.path.join(self.dir, "control.sock")
        args = ["qemu-system-x86_64"] + guest.qemu_accel_args() + [
            "-m", str(GUEST_MEMORY_MIB), "-smp", str(GUEST_CPUS),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", guest.kernel, "-initrd", guest.initrd,
            # panic=-1 with -no-reboot: a panicking guest ends qemu at once.
            "-append", "console=ttyS0 panic=-1 quiet",
            "-serial", "file:" + self.console_path,
            # ttyS1: the host's messages to wait_host.
            "-serial", "unix:{},server=on,wait=off".format(self.control_path),
            "-drive", "file={},format=raw,if=none,id=job,readonly=on".format(job.disk(self.dir)),
            "-device", "virtio-blk-pci,drive=job,serial=job",
        ]
        for i, (serial, path) in enumerate(disks.items()):
            args += ["-drive", "file={},format=raw,if=none,id=d{},cache=none,aio=io_uring,"
                     "discard=unmap".format(path, i),
                     "-device", "virtio-blk-pci,drive=d{},serial={}{}".format(
                         i, serial, block_size_props(path))]
        with open(self.qemu_log_path, "w") as qemu_log:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                            stdout=qemu_log, stderr=subprocess.STDOUT)
        cleanup.add("qemu {}".format(self.process.pid), self.kill)
        self.control = None
        log("qemu {} started ({}): disks {}".format(self.process.pid, guest.accel, disks))

    def console(self):
        return read_text(self.console_path)

    def qemu_messages(self):
        return read_text(self.qemu_log_path)

    def wait_line(self, prefix, timeout=BOOT_TIMEOUT):
        """Waits until the console has a line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.strip().startswith(prefix) for line in self.console().splitlines()):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("the guest never printed {!r} (qemu {}):\n{}\n{}".format(
            prefix, "exited {}".format(self.process.returncode)
            if self.process.poll() is not None else "still running",
            Outcome(self.console()).tail(), self.qemu_messages()))

    def tell(self, word):
        """Sends `word` to the guest's wait_host."""
        if self.control is None:
            self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.control.connect(self.control_path)
        self.control.sendall(word.encode() + b"\n")

    def wait(self, timeout=BOOT_TIMEOUT, fail=True):
        """Waits for qemu to exit (the guest powers off after its job) and
        returns the Outcome. A guest that does not finish in time is
        killed; with `fail`, an unfinished or failed job fails the test,
        without it the result is None."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            if not fail:
                return None
            raise AssertionError("the guest did not power off within {} s:\n{}".format(
                timeout, Outcome(self.console()).tail()))
        self.close_control()
        outcome = Outcome(self.console())
        log("qemu {} exited {}: job rc {}, results {}".format(
            self.process.pid, self.process.returncode, outcome.rc,
            {k: v if len(v) < 200 else v[:200] + "…" for k, v in outcome.results.items()}))
        if fail and outcome.rc != 0:
            raise AssertionError("the guest's job {} (qemu exit {}):\n{}\n{}".format(
                "never ended" if outcome.rc is None else "exited {}".format(outcome.rc),
                self.process.returncode, outcome.tail(), self.qemu_messages()))
        if not fail and outcome.rc is None:
            return None
        return outcome

    def kill(self):
        """SIGKILL, as a crashing hypervisor would end."""
        if self.process.poll() is None:
            self.process.kill()
            log("qemu {} killed".format(self.process.pid))
        self.process.wait()
        self.close_control()

    def close_control(self):
        if self.control is not None:
            self.control.close()
            self.control = None


def block_size_props(path):
    """For a block device, its logical block size given to the guest, as
    Xen's blkback and libvirt's <blockio> do. `volume attach` gives 512
    unless asked for 4096 (`--block-size 4096`, direct I/O on XFS), and a
    guest told 512 by qemu would then send requests the device refuses (a
    discard at a 1 KiB offset: EINVAL)."""
    if not path.startswith("/dev/"):
        return ""
    name = os.path.basename(os.path.realpath(path))
    size = read_text("/sys/block/{}/queue/logical_block_size".format(name)).strip()
    if not size or size == "512":
        return ""
    return ",logical_block_size={0},physical_block_size={0}".format(size)


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def boot(guest, job, disks, cleanup, timeout=BOOT_TIMEOUT):
    """Boots the guest with `job` and waits until it powers off."""
    return VM(guest, job, disks, cleanup=cleanup).wait(timeout=timeout)


# ---------------------------------------------------------------- pools

class Pool:
    """A reflinkfs pool in `base`, driven through the CLI, mounted on
    base/mnt while a test runs."""

    def __init__(self, base, cleanup):
        self.path = os.path.join(base, "pool")
        self.mountpoint = os.path.join(base, "mnt")
        self.cleanup = cleanup
        os.makedirs(self.mountpoint)
        self.cli("pool", "init")

    def cli(self, *args, check=True, pool=True):
        cmd = [binary()] + list(args) + (["--pool", self.path] if pool else [])
        return run(cmd, check=check)

    def json(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def mount(self):
        self.cli("mount", self.path, self.mountpoint, pool=False)
        self.cleanup.add("mount " + self.mountpoint, self.unmount)

    def unmount(self):
        """`reflinkfs unmount`, retried while a volume is still open (a
        killed qemu's files close a moment after it dies); lazily as a
        last resort."""
        deadline = time.monotonic() + IDLE_TIMEOUT
        while os.path.ismount(self.mountpoint):
            out = self.cli("unmount", self.mountpoint, pool=False, check=False)
            if out.returncode == 0:
                return
            # 5: a volume is open; anything else will not pass by waiting.
            if out.returncode != 5 or time.monotonic() > deadline:
                print("reflinkfs unmount: " + out.stderr)
                run(["umount", "-l", self.mountpoint], check=False)
                return
            time.sleep(0.5)

    def create(self, vid, size, snapshot_of=None):
        extra = ["--snapshot-of", snapshot_of] if snapshot_of else []
        self.cli("volume", "create", vid, "--size", size, *extra)

    def image(self, vid):
        return os.path.join(self.path, vid + ".img")

    def revisions(self, vid):
        return self.json("volume", "revisions", vid)

    def allocated(self, vid):
        """Bytes allocated by the volume's files (images and revisions)."""
        return self.json("volume", "info", vid)["usage"]["total"]["allocated"]

    def image_allocated(self, vid):
        """Bytes allocated by the committed image alone."""
        info = self.json("volume", "info", vid)
        return next(f["allocated"] for f in info["usage"]["files"] if f["file"] == info["image"])

    def wait_stopped(self, vid):
        """Waits until the daemon has no open, start or commit of `vid`:
        the kernel sends RELEASE after qemu's last close returned, so the
        commit ends a moment after qemu exits."""
        deadline = time.monotonic() + IDLE_TIMEOUT
        while True:
            status = self.json("status")
            assert vid not in status["held"], "{} is held: {}".format(vid, status)
            busy = [v for v in status["running"] + status["busy"] if v["vid"] == vid]
            if not busy and vid not in status["commits_in_flight"]:
                return
            assert time.monotonic() < deadline, "{} still busy after {} s: {}".format(
                vid, IDLE_TIMEOUT, status)
            time.sleep(0.2)


# ---------------------------------------------------------------- disk paths

class FileDisk:
    """qemu opens the volume's CLASS/VM/NAME-dirty.img on the mount: the
    open starts the volume, the last close (qemu's exit) commits it."""

    name = "file"

    def __init__(self, pool, cleanup):
        self.pool = pool

    def open(self, vid):
        return os.path.join(self.pool.mountpoint, vid + "-dirty.img")

    def release(self, vid, after_kill=False):
        self.pool.wait_stopped(vid)


class AttachDisk:
    """`reflinkfs volume attach` gives a loop device, handed to qemu as its
    drive (the way Xen's phy: uses a block device); `volume detach` releases
    it and commits."""

    name = "attach"

    def __init__(self, pool, cleanup):
        self.pool = pool
        self.attached = {}
        cleanup.add("attached volumes", self.detach_all)

    def open(self, vid):
        out = self.pool.json("volume", "attach", vid)
        assert out["vid"] == vid, out
        self.attached[vid] = out["device"]
        log("attached {} as {} (backing {})".format(vid, out["device"], out.get("backing")))
        return out["device"]

    def release(self, vid, after_kill=False):
        """`volume detach`; after a killed VM, `--force` if a plain detach
        is refused (nothing but the dead VM should hold the device)."""
        out = self.pool.cli("volume", "detach", vid, check=not after_kill)
        if out.returncode != 0:
            log("volume detach {} refused after the kill ({}): --force".format(vid, out.stderr.strip()))
            self.pool.cli("volume", "detach", vid, "--force")
        del self.attached[vid]

    def detach_all(self):
        for vid, device in list(self.attached.items()):
            self.pool.cli("volume", "detach", vid, "--force", check=False)
            run(["losetup", "-d", device], check=False)
            del self.attached[vid]


DISK_PATHS = {"file": FileDisk, "attach": AttachDisk}


def release_loops_under(directory):
    """Detaches every loop device whose backing file lives under
    `directory` (what a failed attach or detach may have left)."""
    out = run(["losetup", "-nl", "-O", "NAME,BACK-FILE"], check=False)
    for line in out.stdout.splitlines():
        fields = line.split(None, 1)
        if len(fields) == 2 and fields[1].startswith(directory.rstrip("/") + "/"):
            log("releasing loop device {} ({})".format(fields[0], fields[1]))
            run(["losetup", "-d", fields[0]], check=False)
