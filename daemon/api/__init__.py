"""The operations clients send, one module per group; ``registry`` holds the one table.

- ``operation``: how an operation is declared (handler + argument schema).
- ``registry``: ``OPERATIONS`` (wire name -> operation), ``Api`` (dispatch, shared checks).
- ``builds``: build, ps, builds, log, cancel, delete, status.
- ``show``: show (one build as a record).
- ``frozen``: shell, diff (looking into frozen builds).
- ``images``: image-import, image-ls, image-rm.
- ``exchange``: export, import (OCI images), and export on failure.
- ``store``: pin-add, pin-rm, pin-ls, gc, fsck.
- ``sources``: verify (stamp rules over a spec's or a build's tree).
- ``remote``: push, pull (results to and from remote caches, by hand).
"""
