"""The one exception the driver raises, so that qubesd always gets a
`StoragePoolException` and the driver decides on the protocol's error
`kind` and `cause` (doc/CONTROL.md), never on a message's text."""

import socket

import qubes.storage

from . import control


class ReflinkfsError(qubes.storage.StoragePoolException):
    """A failed request or step: a one-line message for the user, the
    protocol's error `kind` (`not-found`, `busy`, ..., `io` for the
    driver's own) and `cause` (`no-such-volume`, `running`, ...; None when
    unknown)."""

    def __init__(self, message, kind="io", cause=None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.cause = cause

    def is_(self, kind, *causes):
        """Whether this is an error of `kind` with one of `causes`; an
        error without a cause (a daemon before 1.3) counts by its kind."""
        if self.kind != kind:
            return False
        return not causes or self.cause is None or self.cause in causes

    def __str__(self):
        return self.message


def wrap(exc, context):
    """Any failure as a ReflinkfsError: a daemon's refusal keeps its kind,
    cause and message; anything else gets `context` in front."""
    if isinstance(exc, ReflinkfsError):
        return exc
    if isinstance(exc, control.ControlError):
        return ReflinkfsError(" ".join(exc.message.split()) or exc.kind, exc.kind, exc.cause)
    if isinstance(exc, socket.timeout):
        return ReflinkfsError("{}: timed out".format(context), "io", "timed-out")
    if isinstance(exc, OSError):
        return ReflinkfsError("{}: {}".format(context, exc.strerror or exc), "io",
                              "os-error")
    return ReflinkfsError("{}: {}: {}".format(context, type(exc).__name__,
                                              " ".join(str(exc).split())), "io")
