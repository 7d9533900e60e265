"""The user's registry credentials, read where podman, skopeo and docker keep them.

The client runs as its user, so it reads its user's files and sends amberd
the one entry for the registry a request names (``auth`` on the wire);
amberd, running as root for every user, never reads them itself. The first
file that has an entry for the host wins, in the containers tools' order.

A file may send the host to a credential helper instead, as docker does:
``credHelpers`` (``{"HOST": "NAME"}``) first, then the file's own ``auths``,
then its ``credsStore`` (``"NAME"``). The helper is ``docker-credential-NAME``
on PATH, run here, as the user, with ``get`` and the registry on stdin; it
answers ``{"Username": ..., "Secret": ...}`` or fails for "not found".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from amber.daemon.oci.auth import (
    MAX_TOKEN_ANSWER,
    Credentials,
    credentials_for,
    host_aliases,
    parse_auth_file,
)

#: A helper that takes longer is stuck (waiting on a keyring prompt, say): skipped.
HELPER_TIMEOUT = 30.0
_HELPER_NAME = re.compile(r"[A-Za-z0-9._-]+")


def auth_files() -> list[Path]:
    """Where credentials are looked for: $REGISTRY_AUTH_FILE, then the runtime
    dir's and the config dir's containers/auth.json, then ~/.docker/config.json."""
    files: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    files.append(Path(config_home) / "containers" / "auth.json")
    docker = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
    files.append(Path(docker) / "config.json")
    return files


def registry_host(ref: str) -> str | None:
    """The registry a reference names (``docker.io`` for a bare name), None for a path."""
    explicit = ref.startswith("docker://")
    first, slash, _ = ref.removeprefix("docker://").partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io" if explicit else None


def auth_for(*refs: str | None) -> dict[str, Any] | None:
    """The wire ``auth`` for the registries ``refs`` name: ``{host: {username, password}}``,
    or None when the user has no credentials for any of them."""
    hosts = {h for h in (registry_host(r) for r in refs if r) if h}
    found: dict[str, Any] = {}
    for path in auth_files():
        if not hosts - found.keys():
            break
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_TOKEN_ANSWER)
            table, doc = parse_auth_file(data), json.loads(data)
        except (OSError, ValueError, AttributeError):
            continue  # missing or unreadable, as for podman: try the next
        for host in hosts - found.keys():
            creds = _from_file(doc, table, host)
            if creds is not None:
                found[host] = {"username": creds.username, "password": creds.password}
    return found or None


def _from_file(doc: Any, table: dict[str, Credentials], host: str) -> Credentials | None:
    """``host``'s credentials by one file: its credHelpers entry, its auths, its credsStore."""
    helpers = doc.get("credHelpers") if isinstance(doc, dict) else None
    for name in host_aliases(host):
        if isinstance(helpers, dict) and isinstance(helpers.get(name), str):
            return helper_credentials(helpers[name], host)
    creds = credentials_for(table, host)
    store = doc.get("credsStore") if isinstance(doc, dict) else None
    if creds is None and isinstance(store, str) and store:
        creds = helper_credentials(store, host)
    return creds


def helper_credentials(helper: str, host: str) -> Credentials | None:
    """What ``docker-credential-HELPER get`` says for ``host`` (None: not found, or no helper)."""
    if not _HELPER_NAME.fullmatch(helper):
        return None
    import subprocess  # only with a helper: the client starts faster without it

    server = "https://index.docker.io/v1/" if host in host_aliases("docker.io") else host
    try:
        proc = subprocess.run([f"docker-credential-{helper}", "get"], input=server.encode(),
                              capture_output=True, timeout=HELPER_TIMEOUT, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None  # no such helper, or stuck: as if it had nothing
    if proc.returncode != 0 or len(proc.stdout) > MAX_TOKEN_ANSWER:
        return None  # "credentials not found in native keychain", usually
    try:
        answer = json.loads(proc.stdout)
        user, secret = answer.get("Username"), answer.get("Secret")
    except (ValueError, AttributeError):
        return None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        return None
    return Credentials(user, secret)
