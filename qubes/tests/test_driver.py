"""qubesd's calling sequences against a real mounted reflinkfs pool: VM
start and stop with a loop device in between, a DispVM whose root is a
snapshot of its template's root, revert, resize while running, backup and
restore, clone, is_outdated, and a pool that keeps no revisions."""

import hashlib
import os
import subprocess
import time

import pytest
import qubes.storage

from conftest import MIB, VM, read, write


def data(tag, n=4096):
    return bytes([tag]) * n


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def appvm_volumes(host, pool, vm, template_root):
    """An AppVM's volumes as qubesd configures them."""
    return {
        "root": host.volume(pool, vm, "root", snap_on_start=True, save_on_stop=False,
                            source=template_root, size=template_root._size),
        "private": host.volume(pool, vm, "private", save_on_stop=True),
        "volatile": host.volume(pool, vm, "volatile", size=2 * MIB),
    }


def start_vm(host, volumes):
    """qubesd's VM start: verify and start every volume, then Xen's block
    script attaches each block device."""
    for v in volumes.values():
        assert host.run(v.verify()) is True
    for v in volumes.values():
        host.run(v.start())
    return {name: host.attach(v) for name, v in volumes.items()}


def stop_vm(host, volumes, devs, lag=0.3):
    """The domain is gone; the loop devices let go a moment later, while
    qubesd's stop() already waits."""
    pending = [host.detach(d, after=lag) for d in devs.values()]
    for v in volumes.values():
        host.run(v.stop())
    for p in pending:
        if p is not None:
            p.wait()


def run_once(host, vol, tag):
    """A VM run that writes `tag`'s block at the start of `vol`."""
    devs = start_vm(host, {"v": vol})
    write(devs["v"], data(tag))
    stop_vm(host, {"v": vol}, devs)


def template_and_appvm_root(host, pool):
    """A template's root and an AppVM's root that is its snapshot, made."""
    tpl = host.volume(pool, VM("fedora", template=True), "root", save_on_stop=True)
    host.run(tpl.create())
    root = host.volume(pool, VM("work"), "root", snap_on_start=True, save_on_stop=False,
                       source=tpl, size=tpl._size)
    host.run(root.create())
    return tpl, root


def image(pool, vid):
    return os.path.join(pool.dir_path, vid + ".img")


def test_pool_add_setup_and_config_round_trip(host):
    pool = host.pool("vmpool", revisions_to_keep="2")
    assert os.path.isdir(os.path.join(pool.dir_path, "appvms"))
    assert os.path.isdir(os.path.join(pool.dir_path, "vm-templates"))
    assert os.path.ismount(pool.mountpoint)
    config = pool.config
    assert config["driver"] == "reflinkfs" and config["revisions_to_keep"] == "2"
    # qubesd rebuilds the pool from qubes.xml at every start: from strings.
    again = type(pool)(**{k: v for k, v in config.items() if k != "driver"})
    assert again.dir_path == pool.dir_path and again.revisions_to_keep == 2
    assert pool.size > 0 and 0 < pool.usage <= pool.size
    assert set(pool.usage_details) == {"data_size", "data_usage"}
    # A second setup of the same directory keeps the pool.
    host.run(again.setup())


def test_vm_start_and_stop_commit_through_the_loop_device(host):
    pool = host.pool()
    tpl = host.volume(pool, VM("fedora", template=True), "root", save_on_stop=True)
    host.run(tpl.create())
    vols = appvm_volumes(host, pool, VM("work"), tpl)
    for v in vols.values():
        host.run(v.create())
    assert vols["private"].revisions == {}
    devs = start_vm(host, vols)
    assert vols["private"].is_dirty()
    write(devs["private"], data(1))
    write(devs["root"], data(2))
    write(devs["volatile"], data(3))
    stop_vm(host, vols, devs)
    # stop() returned: the commit is done and durable.
    private = vols["private"]
    assert not private.is_dirty()
    assert list(private.revisions) == ["1"]
    assert read(image(pool, "appvms/work/private"), 4096) == data(1)
    # The snapshot's and the volatile's writes are gone.
    assert not os.path.exists(os.path.join(pool.dir_path, "appvms/work/root-dirty.img"))
    assert read(os.path.join(pool.dir_path, "vm-templates/fedora/root.img"), 4096) == bytes(4096)
    # stop() again (qubesd's start does it for every halted VM): at once.
    for v in vols.values():
        host.run(v.stop())


def test_a_stop_that_waits_in_vain_names_what_holds_the_volume(host):
    pool = host.pool(stop_timeout="0.5")
    vol = host.volume(pool, VM("work"), "private", save_on_stop=True)
    host.run(vol.create())
    host.run(vol.start())
    dev = host.attach(vol)
    # A domain that does not let go: the file path's loop device, or a
    # process that keeps the attached device open.
    holder = None
    if host.mode == "attach":
        holder = subprocess.Popen(["sleep", "60"], stdin=open(dev, "rb"))
    try:
        with pytest.raises(qubes.storage.StoragePoolException) as e:
            host.run(vol.stop())
        assert ("sleep (PID {})".format(holder.pid) if holder else dev) in str(e.value)
        assert "\n" not in str(e.value)
    finally:
        # A failed assertion must not leave the device held for the cleanup.
        if holder:
            holder.kill()
            holder.wait()
    host.detach(dev)
    # The kernel lets go of a detached loop device a moment later: on a
    # busy machine, more than the 0.5 s above.
    pool.stop_timeout = 60
    host.run(vol.stop())
    assert not vol.is_dirty()


def test_dispvm_root_is_a_snapshot_of_the_templates_root(host):
    pool = host.pool()
    tpl = host.volume(pool, VM("fedora", template=True), "root", save_on_stop=True)
    host.run(tpl.create())
    # The template writes its root.
    run_once(host, tpl, 7)
    app = appvm_volumes(host, pool, VM("work"), tpl)
    for v in app.values():
        host.run(v.create())
    # qubesd resolves a DispVM's root down to the template's root, its
    # private to the AppVM's private.
    disp = {
        "root": host.volume(pool, VM("disp1"), "root", snap_on_start=True,
                            save_on_stop=False, source=tpl, size=tpl._size),
        "private": host.volume(pool, VM("disp1"), "private", snap_on_start=True,
                               save_on_stop=False, source=app["private"],
                               size=app["private"]._size),
        "volatile": host.volume(pool, VM("disp1"), "volatile"),
    }
    for v in disp.values():
        host.run(v.create())
    devs = start_vm(host, disp)
    assert read(devs["root"], 4096) == data(7)
    write(devs["root"], data(8))
    write(devs["private"], data(9))
    stop_vm(host, disp, devs)
    assert read(os.path.join(pool.dir_path, "vm-templates/fedora/root.img"), 4096) == data(7)
    assert read(image(pool, "appvms/work/private"), 4096) == bytes(4096)
    # An auto-cleanup DispVM is removed after its stop.
    for v in disp.values():
        host.run(v.remove())
    assert not os.path.exists(os.path.join(pool.dir_path, "appvms/disp1"))


def test_revert_and_resize_while_running(host):
    pool = host.pool(revisions_to_keep="2")
    vol = host.volume(pool, VM("work"), "private", save_on_stop=True, revisions_to_keep=2)
    host.run(vol.create())
    for tag in (1, 2):
        run_once(host, vol, tag)
    assert list(vol.revisions) == ["1", "2"]
    # Resize while running: the loop device sees the new size at once.
    devs = start_vm(host, {"private": vol})
    host.run(vol.resize(8 * MIB))
    size = subprocess.run(["blockdev", "--getsize64", devs["private"]],
                          check=True, capture_output=True, text=True).stdout.strip()
    assert int(size) == 8 * MIB and vol.size == 8 * MIB
    with pytest.raises(qubes.storage.StoragePoolException):
        host.run(vol.resize(2 * MIB))
    stop_vm(host, {"private": vol}, devs)
    assert vol.size == 8 * MIB
    # Each commit kept the image before it: revision 3 is the 4 MiB image
    # of the second run, revision 2 that of the first.
    assert list(vol.revisions) == ["2", "3"]
    # `qvm-volume revert work:private` takes the newest revision.
    host.run(vol.revert())
    assert read(image(pool, "appvms/work/private"), 4096) == data(2)
    assert vol.size == 4 * MIB
    # Every revert keeps the image it replaced as a new revision: undone
    # by a revert to that one.
    replaced = sha(image(pool, "appvms/work/private"))
    before = list(vol.revisions)
    host.run(vol.revert("2"))
    assert read(image(pool, "appvms/work/private"), 4096) == data(1)
    after = list(vol.revisions)
    kept = [r for r in after if r not in before]
    assert len(kept) == 1 and int(kept[0]) > max(int(r) for r in before)
    [path] = [os.path.join(pool.dir_path, "appvms/work", f)
              for f in os.listdir(os.path.join(pool.dir_path, "appvms/work"))
              if f.startswith("private.img.{}@".format(kept[0]))]
    assert sha(path) == replaced
    host.run(vol.revert(kept[0]))
    assert sha(image(pool, "appvms/work/private")) == replaced


def test_backup_and_restore(host):
    pool = host.pool()
    vol = host.volume(pool, VM("work"), "private", save_on_stop=True)
    host.run(vol.create())
    run_once(host, vol, 4)
    committed = sha(image(pool, "appvms/work/private"))
    # qvm-backup of a running VM reads the state from before its start.
    devs = start_vm(host, {"private": vol})
    write(devs["private"], data(5))
    path = host.run(vol.export())
    assert sha(path) == committed
    host.run(vol.export_end(path))
    stop_vm(host, {"private": vol}, devs)
    # qvm-backup-restore into a new VM: import_data, qubesd's dd, end.
    new = host.volume(pool, VM("restored"), "private", save_on_stop=True)
    host.run(new.create())
    backup = os.path.join(host.base, "private.backup")
    with open(backup, "wb") as f:
        f.write(data(6, 2 * MIB) + bytes(4 * MIB))
    target = host.run(new.import_data(6 * MIB))
    assert os.path.getsize(target) == 6 * MIB and " " not in target
    subprocess.run(["dd", "if=" + backup, "of=" + target, "bs=1M",
                    "conv=sparse,notrunc,nocreat", "status=none"], check=True)
    host.run(new.import_data_end(True))
    assert new.size == 6 * MIB
    assert read(os.path.join(pool.dir_path, "appvms/restored/private.img"), 4096) == data(6)
    # A restore that fails changes nothing.
    target = host.run(new.import_data(6 * MIB))
    host.run(new.import_data_end(False))
    assert not os.path.exists(target)
    assert read(os.path.join(pool.dir_path, "appvms/restored/private.img"), 4096) == data(6)


def test_clone_within_the_pool_and_from_another(host):
    pool = host.pool()
    src = host.volume(pool, VM("work"), "private", save_on_stop=True)
    host.run(src.create())
    run_once(host, src, 5)
    # qvm-clone: create, then import_volume (a reflink within the pool).
    dst = host.volume(pool, VM("work2"), "private", save_on_stop=True)
    host.run(dst.create())
    host.run(dst.import_volume(src))
    assert read(os.path.join(pool.dir_path, "appvms/work2/private.img"), 4096) == data(5)
    # From another pool, through export and a passed file.
    other = host.pool("otherpool")
    far = host.volume(other, VM("work3"), "private", save_on_stop=True)
    host.run(far.create())
    host.run(far.import_volume(src))
    assert read(os.path.join(other.dir_path, "appvms/work3/private.img"), 4096) == data(5)
    assert far.size == src.size


def test_is_outdated_after_the_template_commits(host):
    pool = host.pool()
    tpl, root = template_and_appvm_root(host, pool)
    devs = start_vm(host, {"root": root})
    assert root.is_outdated() is False
    run_once(host, tpl, 3)
    assert root.is_outdated() is True
    stop_vm(host, {"root": root}, devs)
    devs = start_vm(host, {"root": root})
    assert root.is_outdated() is False
    assert read(devs["root"], 4096) == data(3)
    stop_vm(host, {"root": root}, devs)


def test_a_pool_that_keeps_no_revisions(host):
    pool = host.pool(revisions_to_keep="0")
    vol = host.volume(pool, VM("work"), "private", save_on_stop=True)
    assert vol.revisions_to_keep == 0
    host.run(vol.create())
    for tag in (1, 2):
        run_once(host, vol, tag)
    assert vol.revisions == {}
    assert read(image(pool, "appvms/work/private"), 4096) == data(2)
    # `qvm-pool set vmpool -o revisions_to_keep=3` reaches reflinkfs.
    pool.revisions_to_keep = 3
    assert '"revisions_to_keep": 3' in host.cli(pool, "pool", "info", "--json")


def test_errors_are_storage_pool_exceptions_with_one_line(host):
    pool = host.pool()
    tpl, root = template_and_appvm_root(host, pool)
    os.remove(os.path.join(pool.dir_path, "vm-templates/fedora/root.img"))
    with pytest.raises(qubes.storage.StoragePoolException) as e:
        host.run(root.verify())
    assert "vm-templates/fedora/root" in str(e.value) and "\n" not in str(e.value)
    # qvm-volume config work:private rw False, while halted: it sticks.
    vol = host.volume(pool, VM("work"), "private", save_on_stop=True)
    host.run(vol.create())
    vol.rw = False
    assert '"rw": false' in host.cli(pool, "volume", "info", "work:private", "--json")
    with pytest.raises(qubes.storage.StoragePoolException) as e:
        host.run(host.volume(pool, VM("work"), "private", save_on_stop=True).create())
    assert "exists" in str(e.value)


def test_start_mounts_the_pool_when_it_is_not_mounted(host):
    pool = host.pool()
    vol = host.volume(pool, VM("work"), "private", save_on_stop=True)
    host.run(vol.create())
    subprocess.run([pool.reflinkfs, "unmount", pool.mountpoint], check=True,
                   capture_output=True)
    assert not os.path.ismount(pool.mountpoint)
    host.run(vol.start())
    assert os.path.ismount(pool.mountpoint)
    if host.mode == "file":
        assert vol.block_device().path == os.path.join(pool.mountpoint,
                                                       "appvms/work/private-dirty.img")
    else:
        assert vol.block_device().path.startswith("/dev/loop")
    dev = host.attach(vol)
    write(dev, data(1))
    host.detach(dev)
    host.run(vol.stop())
    assert list(vol.revisions) == ["1"]
    time.sleep(0)


def test_pins_discard_and_a_queued_revert(host):
    """Issue 17: a pinned revision outlives the prunes; a revert of a
    running qube happens at its stop and drops the run's writes; so does
    discard_changes; cancel_pending withdraws one."""
    pool = host.pool(revisions_to_keep="1")
    vol = host.volume(pool, VM("work"), "private", save_on_stop=True, revisions_to_keep=1)
    host.run(vol.create())
    for tag in (1, 2):
        run_once(host, vol, tag)
    # Revision 2 holds the first run's data.
    assert list(vol.revisions) == ["2"]
    host.run(vol.pin_revision("2", note="before the upgrade"))
    assert vol.pinned_revisions == {"2": "before the upgrade"}
    for tag in (3, 4, 5):
        run_once(host, vol, tag)
    assert list(vol.revisions) == ["2", "5"], "one pinned + revisions_to_keep=1"
    # A revert of the running qube: queued, done at the stop.
    devs = start_vm(host, {"private": vol})
    write(devs["private"], data(9))
    host.run(vol.revert("2"))
    assert read(image(pool, "appvms/work/private"), 4096) == data(5), "not yet"
    stop_vm(host, {"private": vol}, devs)
    assert read(image(pool, "appvms/work/private"), 4096) == data(1)
    assert "2" in vol.revisions and not vol.is_dirty()
    # discard_changes, and a withdrawn one.
    devs = start_vm(host, {"private": vol})
    write(devs["private"], data(7))
    host.run(vol.discard_changes())
    stop_vm(host, {"private": vol}, devs)
    assert read(image(pool, "appvms/work/private"), 4096) == data(1)
    devs = start_vm(host, {"private": vol})
    write(devs["private"], data(8))
    host.run(vol.discard_changes())
    assert host.run(vol.cancel_pending()) is True
    stop_vm(host, {"private": vol}, devs)
    assert read(image(pool, "appvms/work/private"), 4096) == data(8)
    # Unpinned, it goes with the next prune.
    host.run(vol.unpin_revision("2"))
    run_once(host, vol, 6)
    assert "2" not in vol.revisions and vol.pinned_revisions == {}
