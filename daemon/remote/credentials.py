"""amberd's own registry credentials: ``[cache] registry-auth-file``.

The file is a containers ``auth.json`` (``podman login --authfile``, or a
docker ``config.json``), read once at start by root and used for amberd's
own requests to its remotes (lookups, pushes, pin tags), never for a
user's request (those carry the user's own, see ``oci/auth.py``). It holds
passwords, so it must be root's and readable by root alone: a file another
user could write would let them point amberd's pushes at their own account,
and one anyone may read leaks the fleet's push credential. systemd's
``LoadCredential=amber-registry-auth:/etc/amber/registry-auth.json`` gives
``/run/credentials/amberd.service/amber-registry-auth``, mode 0400, root's:
name that path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from amber.daemon.oci.auth import Credentials, parse_auth_file

#: An auth file is a few entries; more than this is not one.
MAX_AUTH_FILE = 1 << 20


class CredentialsError(ValueError):
    """The registry-auth-file cannot be used; the message says why and what to do."""


def load_auth_file(path: Path | None) -> dict[str, Credentials]:
    """The credentials in ``path`` by registry host (none for no path)."""
    if path is None:
        return {}
    what = f"[cache] registry-auth-file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CredentialsError(f"{what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsError(f"{what}: not a regular file")
        if st.st_uid != 0:
            raise CredentialsError(f"{what}: owned by uid {st.st_uid}, not root; chown root it")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CredentialsError(
                f"{what}: group or world writable (mode {stat.S_IMODE(st.st_mode):04o}); "
                "another user could change amberd's credentials: chmod 0600 it"
            )
        if st.st_mode & stat.S_IROTH:
            raise CredentialsError(
                f"{what}: world readable (mode {stat.S_IMODE(st.st_mode):04o}); "
                "it holds passwords: chmod 0600 it"
            )
        data = os.read(fd, MAX_AUTH_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_AUTH_FILE:
        raise CredentialsError(f"{what}: larger than {MAX_AUTH_FILE} bytes")
    try:
        return parse_auth_file(data)
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise CredentialsError(f"{what}: not an auth.json ({exc})") from None
