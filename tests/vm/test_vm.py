"""Real VMs booting from reflinkfs volumes (issue 13): a Debian 6.1 kernel
and a busybox initramfs under qemu, with the volume as its virtio disk, by
two paths (the `disk` parameter):

- file: qemu opens CLASS/VM/NAME-dirty.img on the mount;
- attach: qemu gets the loop device of `reflinkfs volume attach`.

Each guest runs one job (a shell script) and powers off; the host checks
what the pool kept. Run with:

    REFLINKFS_TEST_FS=xfs=/mnt/scratch-xfs /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/vm
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
import time

import pytest

import vmlib
from vmlib import MIB, Cleanup, Guest, Job, Pool, boot

PRIVATE = "appvms/vm/private"
TEMPLATE_ROOT = "vm-templates/tpl/root"
DISPVM_ROOT = "appvms/disp/root"
BIG_FILE_MIB = 128


@pytest.fixture(scope="session")
def guest():
    g = Guest.build()
    vmlib.log("guest kernel: {}".format(g.kernel_version))
    g.choose_accel()
    return g


class Host:
    """One test's pool (mounted), its scratch directory, and the cleanup
    that undoes everything the test made."""

    def __init__(self, base, cleanup):
        self.base = base
        self.cleanup = cleanup
        self.pool = Pool(base, cleanup)
        self.pool.mount()


@pytest.fixture
def host(request):
    vmlib.require("losetup", "e2fsck", "mke2fs", "ldd")
    vmlib.binary()
    base = tempfile.mkdtemp(prefix="vm-{}-".format(request.node.name[5:30]),
                            dir=vmlib.scratch_xfs())
    cleanup = Cleanup()
    try:
        yield Host(base, cleanup)
    finally:
        cleanup.run()
        vmlib.release_loops_under(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=sorted(vmlib.DISK_PATHS))
def disk(request, host):
    return vmlib.DISK_PATHS[request.param](host.pool, host.cleanup)


def trimmed_bytes(fstrim_output):
    """What `fstrim -v` says it trimmed (busybox: "/mnt: N bytes trimmed")."""
    match = re.search(r"(\d+) bytes", fstrim_output)
    assert match, fstrim_output
    return int(match.group(1))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


# mkfs.ext4 in the guest is the host's, with its libraries and config.
EXT4_TOOLS = ["mkfs.ext4"]
EXT4_FILES = {"/etc/mke2fs.conf": "/etc/mke2fs.conf"}


def ext4_job(script):
    return Job(script, tools=EXT4_TOOLS, files=EXT4_FILES)


# The first boot of a private volume: a new ext4 with a known file, its
# checksum and a version number; then a large file written, synced, deleted
# and trimmed. The host measures the allocation between the write and the
# delete (wait_host).
FIRST_BOOT = r"""
mkfs.ext4 -q -F /dev/disk/data
mount /dev/disk/data /mnt
head -c 4194304 /dev/urandom > /mnt/known
sha256sum /mnt/known | cut -d' ' -f1 > /mnt/known.sha256
echo 1 > /mnt/version
result known_sha "$(cat /mnt/known.sha256)"
head -c 1048576 /dev/urandom > /tmp/chunk
i=0
while [ $i -lt {big} ]; do cat /tmp/chunk; i=$((i + 1)); done > /mnt/big
sync
wait_host big-written
rm /mnt/big
sync
result fstrim "$(fstrim -v /mnt)"
umount /mnt
""".replace("{big}", str(BIG_FILE_MIB))

# A later boot: what the volume holds, then the next version written.
NEXT_BOOT = r"""
mount /dev/disk/data /mnt
result known_sha "$(sha256sum /mnt/known | cut -d' ' -f1)"
result saved_sha "$(cat /mnt/known.sha256)"
result version "$(cat /mnt/version)"
echo $(( $(cat /mnt/version) + 1 )) > /mnt/version
umount /mnt
"""


def boot_on(guest, host, disk, vid, job, serial="data"):
    """Boots `job` with volume `vid` as the disk `serial`; then releases
    the volume, which commits it."""
    outcome = boot(guest, job, {serial: disk.open(vid)}, host.cleanup)
    disk.release(vid)
    return outcome


def first_boot(guest, host, disk):
    """Runs FIRST_BOOT on a new private volume; returns the outcome, the
    volume's allocation with the large file written, and the committed
    image's allocation after the trim and the commit."""
    host.pool.create(PRIVATE, "256M")
    vm = vmlib.VM(guest, ext4_job(FIRST_BOOT), {"data": disk.open(PRIVATE)}, host.cleanup)
    vm.wait_line("@@@ wait big-written")
    # The committed image is still the empty one: all of this is the
    # running volume's, large file included.
    with_big_file = host.pool.allocated(PRIVATE)
    vm.tell("big-written")
    outcome = vm.wait()
    disk.release(PRIVATE)
    return outcome, with_big_file, host.pool.image_allocated(PRIVATE)


def test_commit_and_trim(guest, host, disk):
    """A guest makes an ext4, writes, deletes a large file and trims: the
    VM's exit commits one revision, and the trim reached the backing file."""
    outcome, with_big_file, committed = first_boot(guest, host, disk)
    vmlib.log("allocated: {} MiB with the large file, {} MiB committed after the trim ({})".format(
        with_big_file // MIB, committed // MIB, outcome["fstrim"]))
    assert len(host.pool.revisions(PRIVATE)) == 1
    assert with_big_file >= BIG_FILE_MIB * MIB
    # Without the trim the deleted file's blocks would still be allocated.
    assert committed < with_big_file - BIG_FILE_MIB * MIB // 2
    assert host.pool.json("pool", "check") == []


def test_data_survives_and_revert_goes_back(guest, host, disk):
    """The next boot sees the data and its checksum; after `volume revert`
    a boot sees the state before that boot's changes."""
    first, _, _ = first_boot(guest, host, disk)

    second = boot_on(guest, host, disk, PRIVATE, Job(NEXT_BOOT))
    assert second["known_sha"] == first["known_sha"] == second["saved_sha"]
    assert second["version"] == "1"

    host.pool.cli("volume", "revert", PRIVATE)
    third = boot_on(guest, host, disk, PRIVATE, Job(NEXT_BOOT))
    assert third["known_sha"] == first["known_sha"]
    assert third["version"] == "1", "the revert did not go back to the first boot's state"
    assert host.pool.json("pool", "check") == []


# A DispVM's boot: the template's file and checksum, what an earlier boot
# left (nothing, for a disposable root), then its own change.
DISPVM_BOOT = r"""
mount /dev/disk/root /mnt
result template_sha "$(sha256sum /mnt/template-data | cut -d' ' -f1)"
result saved_sha "$(cat /mnt/template-data.sha256)"
if [ -e /mnt/dispvm-was-here ]; then result leftover yes; else result leftover no; fi
echo changed > /mnt/dispvm-was-here
dd if=/dev/urandom of=/mnt/template-data bs=4096 count=1 conv=notrunc,fsync 2>/dev/null
umount /mnt
"""


def test_dispvm_leaves_template_unchanged(guest, host, disk):
    """A DispVM's root is a snapshot of a template's root: it boots from
    the template's data, and its writes touch neither the template nor the
    next DispVM."""
    tree = os.path.join(host.base, "template-tree")
    os.makedirs(tree)
    with open(os.path.join(tree, "template-data"), "wb") as f:
        f.write(os.urandom(2 * MIB))
    data_sha = sha256(os.path.join(tree, "template-data"))
    with open(os.path.join(tree, "template-data.sha256"), "w") as f:
        f.write(data_sha + "\n")
    image = os.path.join(host.base, "template.img")
    vmlib.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image, "64M"])
    host.pool.create(TEMPLATE_ROOT, "64M")
    host.pool.cli("volume", "import", TEMPLATE_ROOT, image)
    host.pool.create(DISPVM_ROOT, "64M", snapshot_of=TEMPLATE_ROOT)
    template_image_sha = sha256(host.pool.image(TEMPLATE_ROOT))
    template_revisions = host.pool.revisions(TEMPLATE_ROOT)

    for which in ("first", "second"):
        outcome = boot_on(guest, host, disk, DISPVM_ROOT, Job(DISPVM_BOOT), serial="root")
        assert outcome["template_sha"] == outcome["saved_sha"] == data_sha, which
        assert outcome["leftover"] == "no", "the {} DispVM saw an earlier one's change".format(which)
        assert sha256(host.pool.image(TEMPLATE_ROOT)) == template_image_sha, which
    assert host.pool.revisions(TEMPLATE_ROOT) == template_revisions
    assert host.pool.json("pool", "check") == []


# Writes until qemu is killed: fsynced files, round and round.
WRITE_UNTIL_KILLED = r"""
mkfs.ext4 -q -F /dev/disk/data
mount /dev/disk/data /mnt
mkdir /mnt/d
i=0
while :; do
    dd if=/dev/urandom of=/mnt/d/f$((i % 16)) bs=65536 count=16 conv=fsync 2>/dev/null
    i=$((i + 1))
    [ $i -eq 8 ] && echo "@@@ writing"
done
"""

READ_EVERYTHING = r"""
mount /dev/disk/data /mnt
result files "$(ls /mnt/d | wc -l)"
cat /mnt/d/* > /dev/null
umount /mnt
"""


def test_killed_vm_leaves_a_clean_filesystem(guest, host, disk):
    """`kill -9` of qemu while the guest writes: the volume is committed,
    the pool is consistent, and the ext4 in it needs nothing but its
    journal replayed."""
    host.pool.create(PRIVATE, "256M")
    vm = vmlib.VM(guest, ext4_job(WRITE_UNTIL_KILLED), {"data": disk.open(PRIVATE)}, host.cleanup)
    vm.wait_line("@@@ writing")
    time.sleep(2)  # let the writes go on; the kill lands somewhere in them
    vm.kill()
    disk.release(PRIVATE, after_kill=True)
    assert len(host.pool.revisions(PRIVATE)) == 1
    assert host.pool.json("pool", "check") == []

    # fsck of a copy of the committed image, on the host: the journal
    # replayed (what a mount does), then a full read-only check.
    copy = os.path.join(host.base, "fsck.img")
    host.pool.cli("volume", "export", PRIVATE, copy)
    replay = vmlib.run(["e2fsck", "-y", "-E", "journal_only", copy], check=False)
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr
    check = vmlib.run(["e2fsck", "-fn", copy], check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    outcome = boot_on(guest, host, disk, PRIVATE, Job(READ_EVERYTHING))
    assert int(outcome["files"]) > 0
    assert host.pool.json("pool", "check") == []


# reflinkfs on the guest's 6.1 kernel, which has no FUSE passthrough (6.9):
# the daemon serves reads and writes. A pool on an XFS of the guest's own,
# a loop device on a volume, ext4, fstrim, and the commit.
REFLINKFS_IN_GUEST = r"""
mkfs.xfs -q -m reflink=1 /dev/disk/pool
mkdir -p /srv /run/pool /mnt/vol
mount /dev/disk/pool /srv
reflinkfs pool init --pool /srv/pool
reflinkfs volume create appvms/vm/private --size 128M --pool /srv/pool
reflinkfs mount /srv/pool /run/pool
result status "$(reflinkfs status --pool /srv/pool --json | tr -d ' \n')"
# util-linux's losetup, by its path: busybox's sh prefers its own applets.
lo=$(/usr/sbin/losetup --find --show /run/pool/appvms/vm/private-dirty.img)
mkfs.ext4 -q "$lo"
mount "$lo" /mnt/vol
head -c 8388608 /dev/urandom > /mnt/vol/data
sync
rm /mnt/vol/data
sync
result fstrim "$(fstrim -v /mnt/vol)"
umount /mnt/vol
/usr/sbin/losetup -d "$lo"
# The loop device's last close commits, a moment after losetup -d.
revisions() { reflinkfs volume revisions appvms/vm/private --pool /srv/pool --json | tr -d ' \n'; }
n=0
while [ "$(revisions)" = "[]" ] && [ $n -lt 600 ]; do n=$((n + 1)); sleep 0.2; done
result revisions "$(revisions)"
result check "$(reflinkfs pool check --pool /srv/pool --json | tr -d ' \n')"
reflinkfs unmount /run/pool
umount /srv
"""


def test_reflinkfs_inside_a_guest_serves_io_in_the_daemon(guest):
    """reflinkfs itself in a guest with a pre-6.9 kernel: the mount falls
    back to daemon-served I/O, and a loop device on a volume works through
    it, discards and commit included."""
    vmlib.require("mkfs.xfs", "losetup")
    cleanup = Cleanup()
    try:
        pool_disk = os.path.join(vmlib.scratch_xfs(), "guest-pool-{}.img".format(os.getpid()))
        cleanup.add("pool disk", lambda: os.unlink(pool_disk))
        with open(pool_disk, "w") as f:
            f.truncate(1 << 30)
        job = Job(REFLINKFS_IN_GUEST,
                  tools=["mkfs.xfs", "mkfs.ext4", "losetup"],
                  files={"/usr/local/bin/reflinkfs": vmlib.binary(), **EXT4_FILES})
        outcome = boot(guest, job, {"pool": pool_disk}, cleanup)
    finally:
        cleanup.run()
    status = json.loads(outcome["status"])
    assert status["mounted"] and status["io_mode"] == "daemon", status
    assert len(json.loads(outcome["revisions"])) == 1, outcome.tail()
    assert json.loads(outcome["check"]) == []
    assert trimmed_bytes(outcome["fstrim"]) > 0, outcome["fstrim"]
