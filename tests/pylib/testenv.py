"""What scripts/test gives the Python suites (the driver's tests in
qubes/tests, the real-VM tests in tests/vm): the binary, the scratch XFS,
and the rule that in CI (CI=true) a missing capability is a failure,
never a skip."""

import os
import shutil

import pytest

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IN_CI = os.environ.get("CI") == "true"


def missing(what):
    """A capability the suite needs is not there: a skip on a developer's
    machine, a failure in CI."""
    if IN_CI:
        pytest.fail("CI=true but " + what)
    pytest.skip(what)


def require(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            missing("{} is missing".format(tool))


def binary():
    """The reflinkfs binary: REFLINKFS_BIN, else the checkout's debug build."""
    path = os.environ.get("REFLINKFS_BIN") or os.path.join(CHECKOUT, "target/debug/reflinkfs")
    if not os.access(path, os.X_OK):
        pytest.fail("no reflinkfs binary at {} (cargo build, or set REFLINKFS_BIN)".format(path))
    return path


def scratch_xfs_from_env():
    """The scratch XFS (reflink=1) that REFLINKFS_TEST_FS names, or None."""
    for item in os.environ.get("REFLINKFS_TEST_FS", "").split(","):
        name, _, path = item.partition("=")
        if name == "xfs" and os.path.isdir(path):
            return path
    return None
