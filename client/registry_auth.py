"""The user's registry credentials, read where podman, skopeo and docker keep them.

The client runs as its user, so it reads its user's files and sends amberd
the one entry for the registry a request names (``auth`` on the wire);
amberd, running as root for every user, never reads them itself. The first
file that has an entry for the host wins, in the containers tools' order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from amber.daemon.oci.auth import MAX_TOKEN_ANSWER, credentials_for, parse_auth_file


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
                table = parse_auth_file(f.read(MAX_TOKEN_ANSWER))
        except (OSError, ValueError, AttributeError):
            continue  # missing or unreadable, as for podman: try the next
        for host in hosts - found.keys():
            creds = credentials_for(table, host)
            if creds is not None:
                found[host] = {"username": creds.username, "password": creds.password}
    return found or None
