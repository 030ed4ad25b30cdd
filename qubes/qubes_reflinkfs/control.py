"""The client side of a reflinkfs pool's control socket (doc/CONTROL.md).

One request per connection: a JSON message and a newline, with one file
descriptor passed alongside for the requests that take one; one JSON reply
and a newline back. Standard library only.
"""

import json
import os
import socket
import stat
import struct

#: The protocol version this client speaks; the daemon must share its major.
PROTOCOL = "1.3"
MAJOR = PROTOCOL.split(".")[0]

#: Seconds of silence a request may take before it fails (a volume's stop
#: and a data copy have their own).
REQUEST_TIMEOUT = 120
#: Seconds of silence for the requests a synchronous property makes on
#: qubesd's event loop.
QUICK_TIMEOUT = 2

#: The largest reply read (a `volume_list` of many volumes is large).
MAX_REPLY = 64 << 20


class ControlError(Exception):
    """A request the daemon refused or failed: its kind (`not-found`,
    `busy`, ...), the CLI's exit status for it, a one-line message, and
    (protocol 1.3) its machine-readable cause (`no-such-volume`,
    `running`, ...; None when the daemon gave none)."""

    def __init__(self, kind, code, message, cause=None):
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message
        self.cause = cause


class NotMounted(Exception):
    """The pool has no daemon: it is not mounted."""


def socket_path(pool_dir):
    return os.path.join(pool_dir, ".reflinkfs", "control.sock")


def _check_peer(sock, pool_dir):
    """Talks only to a daemon of root, of this user, or of the pool's
    owner: a request (and a file handed over) never goes to a stranger."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    owner = os.stat(pool_dir).st_uid
    if uid not in (0, os.getuid(), owner):
        raise ControlError(
            "refused", 6,
            "{} is served by process {} of uid {}, which is neither root, "
            "this user, nor the pool's owner; not talking to it".format(
                socket_path(pool_dir), pid, uid))


def _open_meta(pool_dir):
    """The pool's metadata directory, opened without following a symlink
    (O_PATH): the socket is reached through it, so a long pool path is no
    problem and a planted link is not followed."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        root = os.open(pool_dir, flags)
    except FileNotFoundError:
        raise NotMounted(pool_dir) from None
    try:
        return os.open(".reflinkfs", flags, dir_fd=root)
    except FileNotFoundError:
        raise NotMounted(pool_dir) from None
    finally:
        os.close(root)


def request(pool_dir, op, fd=None, timeout=None, **fields):
    """Sends one request and returns the reply's data; raises ControlError
    for a refusal (and for a reply that is not one: cut short, too long,
    not JSON, or late, past `timeout` seconds of silence), NotMounted when
    no daemon serves the pool. Other OSErrors (the socket's) pass."""
    path = socket_path(pool_dir)
    meta = _open_meta(pool_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            st = os.stat("control.sock", dir_fd=meta, follow_symlinks=False)
        except FileNotFoundError:
            raise NotMounted(pool_dir) from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError("corrupt", 8, "{} is not a socket (a symlink or other file "
                               "was planted there); not following it".format(path))
        sock.settimeout(timeout)
        try:
            sock.connect("/proc/self/fd/{}/control.sock".format(meta))
        except (ConnectionRefusedError, FileNotFoundError):
            raise NotMounted(pool_dir) from None
        except socket.timeout:
            raise _late(pool_dir, op, timeout) from None
        _check_peer(sock, pool_dir)
        # A field left at its default (None) is not sent: a daemon older
        # than the field then still serves the request (doc/CONTROL.md).
        given = {k: v for k, v in fields.items() if v is not None}
        message = {"protocol": PROTOCOL, "request": dict(given, op=op)}
        data = json.dumps(message).encode() + b"\n"
        if fd is not None:
            sent = socket.send_fds(sock, [data], [fd])
            data = data[sent:]
        sock.sendall(data)
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                chunk = sock.recv(1 << 16)
            except socket.timeout:
                raise _late(pool_dir, op, timeout) from None
            if not chunk:
                break
            reply += chunk
            if len(reply) > MAX_REPLY:
                raise ControlError("io", 1, "the daemon's reply is too long")
    finally:
        sock.close()
        os.close(meta)
    if not reply:
        raise ControlError("io", 1, "the daemon of {} closed the connection without "
                           "a reply".format(pool_dir))
    try:
        answer = json.loads(reply)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise ControlError("io", 1, "the daemon of {} sent a reply that is not a JSON "
                           "object ({})".format(pool_dir, e), cause="bad-reply") from None
    theirs = str(answer.get("protocol", "0 (unversioned)"))
    if theirs.split(".")[0] != MAJOR:
        raise ControlError(
            "protocol", 11,
            "the daemon of {} speaks control protocol {}, this driver speaks {}; "
            "unmount the pool and mount it with the reflinkfs this driver "
            "belongs to".format(pool_dir, theirs, PROTOCOL))
    if "error" in answer:
        e = answer["error"]
        if not isinstance(e, dict):
            e = {"message": str(e)}
        raise ControlError(e.get("kind", "io"), e.get("code", 1), str(e.get("message", "")),
                           cause=e.get("cause"))
    try:
        return answer["ok"]["data"]
    except (KeyError, TypeError):
        raise ControlError("io", 1, "the daemon of {} sent a reply with neither ok nor "
                           "error".format(pool_dir), cause="bad-reply") from None


def _late(pool_dir, op, timeout):
    return ControlError("io", 1, "the daemon of {} did not answer {} within {} s".format(
        pool_dir, op, timeout), cause="timed-out")
