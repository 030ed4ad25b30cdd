#!/usr/bin/env python3
"""Installs the driver into the Python that runs it, with the standard
library only (a bare dom0 has no pip `wheel` to build with): copies
`qubes_reflinkfs` into site-packages and writes its dist-info, with the
entry points qubesd looks drivers and extensions up by. `pip uninstall
qubes-reflinkfs` removes it again (RECORD lists every file).

    sudo python3 install.py [--target DIR]
"""

import argparse
import base64
import hashlib
import os
import shutil
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
NAME, DIST, VERSION = "qubes_reflinkfs", "qubes-reflinkfs", "0.2.0"
ENTRY_POINTS = """[qubes.ext]
reflinkfs = qubes_reflinkfs.ext:ReflinkfsExtension

[qubes.storage]
reflinkfs = qubes_reflinkfs:ReflinkfsPool
"""


def digest(path):
    with open(path, "rb") as f:
        h = hashlib.sha256(f.read()).digest()
    return "sha256=" + base64.urlsafe_b64encode(h).rstrip(b"=").decode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=sysconfig.get_paths()["purelib"],
                        help="the site-packages directory (default: %(default)s)")
    target = parser.parse_args().target
    if sys.version_info < (3, 9):
        sys.exit("the driver needs Python 3.9 or later (socket.send_fds)")
    pkg = os.path.join(target, NAME)
    info = os.path.join(target, "{}-{}.dist-info".format(NAME, VERSION))
    for old in os.listdir(target) if os.path.isdir(target) else []:
        if old.startswith(NAME + "-") and old.endswith(".dist-info"):
            shutil.rmtree(os.path.join(target, old))
    shutil.rmtree(pkg, ignore_errors=True)
    os.makedirs(pkg)
    os.makedirs(info)
    files = []
    for name in sorted(os.listdir(os.path.join(HERE, NAME))):
        if name.endswith(".py"):
            shutil.copyfile(os.path.join(HERE, NAME, name), os.path.join(pkg, name))
            files.append(os.path.join(NAME, name))
    meta = {
        "METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\nRequires-Python: >=3.9\n"
                    "Summary: Qubes OS storage driver for reflinkfs pools\n".format(
                        DIST, VERSION),
        "entry_points.txt": ENTRY_POINTS,
        "INSTALLER": "qubes-reflinkfs install.py\n",
    }
    for name, text in meta.items():
        with open(os.path.join(info, name), "w") as f:
            f.write(text)
        files.append(os.path.join(os.path.basename(info), name))
    record = os.path.join(os.path.basename(info), "RECORD")
    with open(os.path.join(target, record), "w") as f:
        for rel in files:
            path = os.path.join(target, rel)
            f.write("{},{},{}\n".format(rel, digest(path), os.path.getsize(path)))
        f.write("{},,\n".format(record))
    print("installed {} {} in {}".format(DIST, VERSION, target))


if __name__ == "__main__":
    main()
