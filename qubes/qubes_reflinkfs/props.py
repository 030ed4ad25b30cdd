"""Attributes qubesd assigns directly (`qvm-pool set`, `qvm-volume config`)
that reflinkfs must hear of too."""


def as_bool(value):
    """qubes.xml and `qvm-pool add -o` give every option as a string."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def pushed(attr, parse, push):
    """A property kept in `attr`: a value qubesd assigns is parsed, and,
    once the object is built (`_ready`), a change is also sent to the
    pool's daemon with `push(obj, value)` before it is kept."""

    def get(self):
        return getattr(self, attr)

    def set_(self, value):
        value = parse(value)
        if getattr(self, "_ready", False) and value != getattr(self, attr, None):
            push(self, value)
        setattr(self, attr, value)

    return property(get, set_)
