"""A minimal stand-in for qubesd's `qubes` package, for the driver's tests
only: written from the public storage API documentation (qubes-core-admin's
"qubes.storage" page), not from Qubes' sources. dom0 has the real one."""
