"""qubesd's flows with its own kind of objects (a VM, its Storage, qubes.xml
saved and loaded again), in qubesd's order, against a real mounted pool:
template change and upgrade, qvm-clone, DispVM start, a killed Import, a
killed daemon, qubes.xml save and reload, and qubesd restarted."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import qubes.storage

from conftest import HERE, MIB, read, write
from test_driver import data

import qubes_reflinkfs.pool


def info(host, pool, vid):
    return json.loads(host.cli(pool, "volume", "info", vid, "--json"))


def run_vm(app, vm, tag=None, volume="root"):
    """Starts `vm`, gives what its `volume` reads first, writes `tag`
    there if given, and shuts it down."""
    devs = app.start(vm)
    seen = read(devs[volume], 4096)
    if tag is not None:
        write(devs[volume], data(tag))
    app.shutdown(vm, devs)
    return seen


def templates(app, *names):
    """Templates whose roots hold data(1), data(2), ... in turn."""
    made = []
    for i, name in enumerate(names, 1):
        tpl = app.add_vm("TemplateVM", name)
        run_vm(app, tpl, tag=i)
        made.append(tpl)
    return made


def work_vm(host, *names):
    """A pool, its app, the templates `names` (see `templates`) and an
    AppVM "work" on the first of them: (pool, app, work, templates)."""
    pool = host.pool()
    app = host.app(pool)
    made = templates(app, *names)
    work = app.add_vm("AppVM", "work", template=made[0])
    return pool, app, work, made


def wait_until(what, check, timeout=60):
    """Polls `check` until it is true; fails naming `what` after a
    generous `timeout` (a progress bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("gave up waiting for " + what)
        time.sleep(0.1)


# -- 1. template change ----------------------------------------------------

def test_a_template_change_reaches_the_root_at_its_next_start(host):
    pool, app, work, (_, tpl_b) = work_vm(host, "tpl-a", "tpl-b")
    assert run_vm(app, work) == data(1)
    # qvm-prefs work template tpl-b: a new Volume object, no create().
    work.set_template(tpl_b)
    app.save()
    root = work.volumes["root"]
    assert root.source is tpl_b.volumes["root"]
    # The next start takes another source: outdated in qubesd's sense.
    assert root.is_outdated() is True
    assert run_vm(app, work) == data(2)
    shown = info(host, pool, "appvms/work/root")
    assert shown["source"] == "vm-templates/tpl-b/root"
    assert root.is_outdated() is False
    # A DispVM of work follows the new template too.
    work_disp = app.add_vm("DispVM", "disp1", template=work)
    assert run_vm(app, work_disp) == data(2)


def test_a_source_change_is_refused_while_the_volume_runs(host):
    """The daemon's side of the same: the driver hears `busy`/`running`
    as a StoragePoolException and changes nothing."""
    pool, app, work, _ = work_vm(host, "tpl-a", "tpl-b")
    devs = app.start(work)
    with pytest.raises(qubes.storage.StoragePoolException) as e:
        pool.call("volume_set", vid="appvms/work/root", property="source",
                  value="vm-templates/tpl-b/root")
    assert e.value.kind == "busy" and e.value.cause == "running"
    app.shutdown(work, devs)
    assert info(host, pool, "appvms/work/root")["source"] == "vm-templates/tpl-a/root"


# -- 2. the whole template upgrade ---------------------------------------

@pytest.mark.parametrize("restart", [False, True], ids=["same-qubesd", "qubesd-restarted"])
def test_template_upgrade_new_template_move_appvms_remove_the_old(host, restart):
    pool = host.pool()
    app = host.app(pool)
    (old,) = templates(app, "fedora-40")
    apps = [app.add_vm("AppVM", name, template=old) for name in ("work", "mail")]
    for vm in apps:
        assert run_vm(app, vm) == data(1)
    # The new template: a clone of the old one, upgraded (it writes).
    new = app.clone_vm(old, "fedora-41")
    assert run_vm(app, new, tag=9) == data(1)
    # Move every AppVM (halted), as qvm-prefs / the template manager do.
    for vm in apps:
        vm.set_template(new)
    app.save()
    if restart:
        app = app.reload()
        old = app.domains["fedora-40"]
        apps = [app.domains["work"], app.domains["mail"]]
    # qvm-remove fedora-40: qubes.xml first, then its storage.
    errors = app.remove_vm(old)
    assert errors == []
    assert not os.path.exists(os.path.join(pool.dir_path, "vm-templates/fedora-40"))
    # The AppVMs start on the new root.
    for vm in apps:
        assert run_vm(app, vm) == data(9)


def test_the_old_template_stays_while_an_appvm_still_uses_it(host):
    pool = host.pool()
    app = host.app(pool)
    (old,) = templates(app, "tpl-a")
    app.add_vm("AppVM", "work", template=old)
    errors = app.remove_vm(old)
    root_errors = [e for e in errors if "appvms/work/root" in str(e)]
    assert root_errors and all(isinstance(e, qubes.storage.StoragePoolException)
                               for e in errors)
    assert os.path.exists(os.path.join(pool.dir_path, "vm-templates/tpl-a/root.img"))


# -- clone, DispVM, qubes.xml ------------------------------------------------

def test_qvm_clone_and_a_dispvm_start(host):
    pool, app, work, (tpl,) = work_vm(host, "tpl")
    run_vm(app, work, tag=5, volume="private")
    work2 = app.clone_vm(work, "work2")
    assert run_vm(app, work2, volume="private") == data(5)
    assert work2.volumes["root"].source is tpl.volumes["root"]
    disp = app.add_vm("DispVM", "disp7", template=work)
    devs = app.start(disp)
    assert read(devs["root"], 4096) == data(1)
    assert read(devs["private"], 4096) == data(5)
    write(devs["private"], data(6))
    app.shutdown(disp, devs)
    assert app.remove_vm(disp) == []
    assert run_vm(app, work, volume="private") == data(5)


def test_qubes_xml_save_and_reload_keeps_every_volume(host):
    pool, app, work, _ = work_vm(host, "tpl")
    run_vm(app, work, tag=3, volume="private")
    host.run(work.volumes["private"].resize(8 * MIB))
    before = app.save()
    again = app.reload()
    assert again.save() == before
    work = again.domains["work"]
    assert work.volumes["private"].size == 8 * MIB
    assert work.volumes["root"].source is again.domains["tpl"].volumes["root"]
    assert run_vm(again, work, volume="private") == data(3)


def test_qubesd_restarted_while_a_vm_runs(host):
    pool, app, work, _ = work_vm(host, "tpl")
    devs = app.start(work)
    write(devs["private"], data(4))
    again = app.reload()
    work = again.domains["work"]
    # The new qubesd finds the same disks, and its stop commits.
    for name, v in work.volumes.items():
        if host.mode == "attach":
            assert v.block_device().path == devs[name]
    again.shutdown(work, devs)
    assert not work.volumes["private"].is_dirty()
    assert read(os.path.join(pool.dir_path, "appvms/work/private.img"), 4096) == data(4)


# -- 3. a killed daemon ------------------------------------------------------

def daemon_pid(pool):
    return pool.call("status")["pid"]


def kill_daemon(pool):
    """SIGKILLs the daemon this test's pool mount started (its PID from
    the pool's own control socket) and waits until it is gone."""
    pid = daemon_pid(pool)
    os.kill(pid, signal.SIGKILL)
    wait_until("daemon {} to exit".format(pid), lambda: not os.path.exists(
        "/proc/{}".format(pid)) or open("/proc/{}/stat".format(pid)).read().split()[2] == "Z")
    return pid


def test_a_killed_daemon_leaves_a_stale_mount_that_the_next_call_replaces(host):
    pool, app, work, _ = work_vm(host, "tpl")
    run_vm(app, work, tag=2, volume="private")
    old = kill_daemon(pool)
    with pytest.raises(OSError) as e:
        os.stat(pool.mountpoint)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    # What qubesd reads synchronously answers at once and mounts nothing;
    # qubes.xml can be saved.
    private = work.volumes["private"]
    assert private.size == 4 * MIB
    app.save()
    assert private.is_dirty() is False
    assert private.block_device().path
    # The next coroutine remounts (recovery runs) and goes on.
    assert run_vm(app, work, volume="private") == data(2)
    assert daemon_pid(pool) != old
    assert os.path.ismount(pool.mountpoint)


def test_every_failure_is_a_storage_pool_exception(host, tmp_path):
    """A daemon that sends garbage, or nothing: the driver's errors are
    StoragePoolExceptions with a kind, whatever goes wrong."""
    import socket
    import threading

    pool = host.pool()
    vol = host.volume(pool, type("VM", (), {"name": "work", "dir_path_prefix": "appvms"}),
                      "private", save_on_stop=True)
    host.run(vol.create())
    subprocess.run([host_binary(), "unmount", pool.mountpoint], check=True,
                   capture_output=True)
    sock_path = os.path.join(pool.dir_path, ".reflinkfs", "control.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(8)
    replies = [b"this is not json\n", b'{"protocol": "1.3"}\n', b"", None]
    held = []

    def serve():
        for reply in replies:
            conn, _ = server.accept()
            conn.recv(1 << 16)
            if reply is None:
                held.append(conn)  # silent: the client's timeout ends it
                continue
            conn.sendall(reply)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        kinds = []
        for _ in replies:
            with pytest.raises(qubes.storage.StoragePoolException) as e:
                vol.is_dirty()
            kinds.append((e.value.kind, e.value.cause))
        assert kinds[0] == ("io", "bad-reply") and kinds[1] == ("io", "bad-reply")
        assert kinds[3] == ("io", "timed-out")
    finally:
        t.join(10)
        for c in held:
            c.close()
        server.close()
        os.remove(sock_path)


def host_binary():
    from conftest import binary
    return binary()


# -- 4. an import killed before its end ----------------------------------------

def test_an_import_whose_script_died_is_begun_anew_and_dropped_at_start(host):
    pool, app, work, _ = work_vm(host, "tpl")
    run_vm(app, work, tag=1, volume="private")
    # qvm-volume import work:private: qubesd's import_data, then the
    # Import script's dd, which is killed half-way: no import_data_end.
    path = host.run(work.storage.import_data("private", 4 * MIB))
    write(path, data(7))
    # Tried again (same qubesd): the daemon drops the old import.
    path = host.run(work.storage.import_data("private", 4 * MIB))
    assert read(path, 4096) == bytes(4096)
    write(path, data(8))
    host.run(work.storage.import_data_end("private", True))
    assert run_vm(app, work, volume="private") == data(8)
    # Killed again, and then the VM is started: start() drops the import.
    path = host.run(work.storage.import_data("private", 4 * MIB))
    write(path, data(9))
    assert run_vm(app, work, volume="private") == data(8)
    assert not os.path.exists(path)
    assert info(host, pool, "appvms/work/private")["state"] == "stopped"


def test_an_import_of_a_qubesd_that_is_gone_is_dropped_by_the_daemon(host):
    pool = host.pool()
    app = host.app(pool)
    vm = app.add_vm("TemplateVM", "tpl")
    # Another qubesd (a process of its own) begins an import and dies.
    script = textwrap.dedent("""
        import os, sys
        sys.path[:0] = [{stubs!r}, {pkg!r}]
        import asyncio, qubes_reflinkfs, qubes_reflinkfs.pool as p
        p.CONFIG_FILE = {conf!r}
        p.STATE_DIR = {state!r}
        pool = qubes_reflinkfs.ReflinkfsPool(**{config!r})
        class VM: name = "tpl"; dir_path_prefix = "vm-templates"
        v = pool.init_volume(VM, dict(name="private", save_on_stop=True, rw=True, size={size}))
        print(asyncio.run(v.import_data({size})), flush=True)
        os.kill(os.getpid(), 9)
    """).format(stubs=os.path.join(HERE, "stubs"), pkg=os.path.dirname(HERE),
                conf=qubes_reflinkfs.pool.CONFIG_FILE, state=qubes_reflinkfs.pool.STATE_DIR, config={k: v for k, v in pool.config.items() if k != "driver"},
                size=4 * MIB)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    leftover = done.stdout.strip()
    assert leftover.endswith("vm-templates/tpl/private-import.img")
    # The daemon drops it once it sees the process gone; this qubesd's
    # import then begins.
    wait_until("the daemon to drop the dead process's import",
               lambda: info(host, pool, "vm-templates/tpl/private")["state"] == "stopped")
    assert not os.path.exists(leftover)
    path = host.run(vm.storage.import_data("private", 4 * MIB))
    write(path, data(3))
    host.run(vm.storage.import_data_end("private", True))
    assert run_vm(app, vm, volume="private") == data(3)


def test_import_abort_online_and_offline(host):
    pool = host.pool()
    app = host.app(pool)
    vm = app.add_vm("TemplateVM", "tpl")
    # Online: the CLI drops an import the driver began.
    path = host.run(vm.storage.import_data("private", 4 * MIB))
    host.cli(pool, "volume", "import", "--abort", "vm-templates/tpl/private")
    assert not os.path.exists(path)
    assert info(host, pool, "vm-templates/tpl/private")["state"] == "stopped"
    # Offline: a NAME-import.img left by a daemon that died mid-import.
    subprocess.run([host_binary(), "unmount", pool.mountpoint], check=True,
                   capture_output=True)
    left = os.path.join(pool.dir_path, "vm-templates/tpl/private-import.img")
    with open(left, "wb") as f:
        f.truncate(4 * MIB)
    host.cli(pool, "volume", "import", "--abort", "vm-templates/tpl/private")
    assert not os.path.exists(left)
    # The driver mounts again and imports.
    path = host.run(vm.storage.import_data("private", 4 * MIB))
    write(path, data(5))
    host.run(vm.storage.import_data_end("private", True))
    assert run_vm(app, vm, volume="private") == data(5)


# -- 5. dom0 hygiene -----------------------------------------------------------

def test_the_binary_is_no_pool_option(host, tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.write_text("#!/bin/sh\ntouch {}\n".format(marker))
    evil.chmod(0o755)
    pool = qubes_reflinkfs.ReflinkfsPool(
        name="evil", dir_path=os.path.join(host.base, "evil"), reflinkfs=str(evil),
        mountpoint=os.path.join(host.base, "evil-mnt"))
    # qubes.xml of an older driver: loaded, the option ignored and dropped.
    assert "reflinkfs" not in pool.config
    # qvm-pool add with it: refused, and the path never runs.
    with pytest.raises(qubes.storage.StoragePoolException) as e:
        host.run(pool.setup())
    assert "reflinkfs" in str(e.value)
    assert not marker.exists()
    # A config file others may write is not trusted.
    os.chmod(qubes_reflinkfs.pool.CONFIG_FILE, 0o666)
    try:
        with pytest.raises(qubes.storage.StoragePoolException) as e:
            host.pool("other")
        assert "writable by root only" in str(e.value)
    finally:
        os.chmod(qubes_reflinkfs.pool.CONFIG_FILE, 0o644)


def test_sync_properties_never_mount(host):
    pool = host.pool()
    app = host.app(pool)
    (tpl,) = templates(app, "tpl")
    subprocess.run([host_binary(), "unmount", pool.mountpoint], check=True,
                   capture_output=True)
    root = tpl.volumes["root"]
    assert root.size == 4 * MIB
    assert root.usage >= 0
    assert root.block_device().path.startswith(pool.mountpoint) or \
        root.block_device().path.startswith("/dev/")
    assert root.is_dirty() is False
    assert list(root.revisions) == ["1"]  # the last known
    app.save()
    assert not os.path.ismount(pool.mountpoint)
    # The next coroutine mounts.
    host.run(root.verify())
    assert os.path.ismount(pool.mountpoint)


def test_a_removed_pool_is_unmounted_when_no_pool_uses_it(host):
    from qubes_reflinkfs.ext import ReflinkfsExtension

    keep = host.pool("keep")
    gone = host.pool("gone")
    assert os.path.ismount(gone.mountpoint)
    pools = {"keep": keep, "gone": gone}

    class App:
        pass

    app = App()
    app.pools = pools
    # qvm-pool remove gone (Qubes 4.2+): out of the pools, no destroy(),
    # then the pool-delete event.
    del pools["gone"]
    host.run(ReflinkfsExtension().on_pool_delete(app, "pool-delete", pool=gone))
    assert not os.path.ismount(gone.mountpoint)
    assert os.path.ismount(keep.mountpoint)
    # A qubesd that starts without the pool in qubes.xml: the sweep
    # unmounts what the driver mounted and no pool uses.
    host.run(gone.setup())
    assert os.path.ismount(gone.mountpoint)
    assert qubes_reflinkfs.pool.sweep_unused_mounts({keep.dir_path}) == [gone.mountpoint]
    assert not os.path.ismount(gone.mountpoint) and os.path.ismount(keep.mountpoint)


def test_the_install_line_needs_only_the_standard_library(tmp_path):
    """doc/QUBES.md's install step on a dom0 without pip's wheel: the
    driver and its extension are found by their entry points."""
    target = tmp_path / "site"
    target.mkdir()
    done = subprocess.run([sys.executable, "-S", os.path.join(os.path.dirname(HERE),
                                                              "install.py"),
                           "--target", str(target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check = textwrap.dedent("""
        import sys
        sys.path[:0] = [{target!r}, {stubs!r}]
        from importlib.metadata import entry_points
        eps = entry_points()
        groups = {{g: [e for e in (eps.select(group=g) if hasattr(eps, "select")
                                   else eps.get(g, []))] for g in ("qubes.storage", "qubes.ext")}}
        print(groups["qubes.storage"][0].load().__module__, groups["qubes.ext"][0].load().__name__)
    """).format(target=str(target), stubs=os.path.join(HERE, "stubs"))
    done = subprocess.run([sys.executable, "-S", "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["qubes_reflinkfs.pool", "ReflinkfsExtension"]
