"""The sandbox: a content-addressed store, FUSE/overlay build roots, namespace sandboxes.

It stands alone (it imports nothing of ``amber.daemon`` or ``amber.client``).
What the daemon may use of it, by module; everything else is internal:

- ``store``: ``Store``, ``Batch``, ``StoreError``, ``MissingObject`` (blobs and trees on disk).
- ``tree``: ``Entry`` and the tree encoding (``tree as treefmt``); the only tree decoder.
- ``digest``: ``from_hex``, ``hash_bytes``, ``new_hasher``, ``CHUNK``, ``EMPTY``.
- ``importer``: ``import_directory`` (a directory on disk becomes a tree).
- ``checkout``: ``checkout``, ``FOR_USER``, ``PRIVILEGED``, ``CheckoutError`` (out-links).
- ``treediff``: ``diff_trees``; ``treeedit``: ``put_entry``, ``ensure_dir``, ``chown_dir``.
- ``fscontrol``: ``FilesystemPool``, ``open_overlay``, ``OverlayMount``, ``FilesystemError``.
- ``fsmode``: ``detect_fs_mode``, ``overlay_options``; ``mounts``: ``mount``, ``umount``, ``mounts_under``,
  ``unmount_all_under``.
- ``runner``: ``run_step``, ``run_interactive``, ``StepOutcome``; ``sandboxspec``: ``Bind``,
  ``BUILD_UID``, ``BUILD_GID``, ``HOMES``; ``sandboxerror``: ``SandboxError``, ``CommandError``;
  ``userns``: ``IdMap``.
- ``asuser``: ``UserReader``, ``User``, ``Unreadable`` (a user's paths opened by a helper process
  that is the user for real); ``importer.import_user_directory`` walks a directory through it.
- ``fsidentity``: ``filesystem_identity`` (fsuid only: ``--export-on-failure``'s file below
  a directory the client opened, pasta's netns); ``as_store_owner``. Paths a user names are opened by the client (client/userfiles.py)
  or by ``asuser``, never resolved by root.
- ``beneath``: ``exists_in_root``, ``write_beneath`` (root inside a tree a user controls).

Internal: ``batch`` (``Batch``, which ``store`` re-exports), ``asuser_helper``, ``lowerfs``,
``fuseops``, ``eagerlayer``, ``snapshot`` (with ``owncwd``), ``command``, ``bwrap``, ``ptyproxy``.
"""
