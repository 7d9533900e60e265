"""amberd, the build daemon. Top level: what starts, configures and serves it.

- ``main``: the ``amberd`` command (``python -m amber.daemon.main``): start, serve, stop.
- ``config``: ``/etc/amber/amberd.toml`` and flags; ``preflight``: what the machine must offer.
- ``context``: ``DaemonContext``, what every part shares; ``server``: the socket, framing,
  dispatch to ``api.registry``; ``systemd``: socket activation, sd_notify, the journal.

Subpackages: ``api`` (operations), ``build`` (running builds), ``storage`` (database,
GC roots, GC, pins), ``oci`` (OCI images in and out).
"""
