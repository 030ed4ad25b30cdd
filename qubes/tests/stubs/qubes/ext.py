"""The parts of `qubes.ext` an extension uses: the Extension base and the
handler decorator. For the driver's tests only; written here."""


class Extension:
    """An extension: qubesd makes one of each and hooks its handlers."""


def handler(*events, **kwargs):
    """Marks a method as the handler of `events` (system-wide with
    system=True); the tests call it as qubesd's event dispatch does:
    handler(subject, event, **kwargs)."""

    def decorator(func):
        func.ha_events = events
        func.ha_system = kwargs.get("system", False)
        return func

    return decorator
