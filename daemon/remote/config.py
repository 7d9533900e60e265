"""The ``[cache]`` table of amberd.toml: remotes, keys, pull and failure policies."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PULL_CHOICES = ("lazy", "eager")
FAILURE_CHOICES = ("replay", "retry")
_URL = re.compile(
    r"^(https?)://([A-Za-z0-9.\-]+(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?)/([a-z0-9]+(?:[._/-][a-z0-9]+)*)$"
)
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CacheConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Remote:
    """One ``[[cache.remote]]``: a registry and a repository in it."""

    url: str
    push: bool = False
    #: Key names whose signatures count here (empty: any trusted key).
    trust: tuple[str, ...] = ()

    @property
    def insecure(self) -> bool:
        return self.url.startswith("http://")

    @property
    def registry(self) -> str:
        return self.url.split("://", 1)[1].split("/", 1)[0]

    @property
    def repository(self) -> str:
        return self.url.split("://", 1)[1].split("/", 1)[1]


@dataclass
class CacheConfig:
    remotes: list[Remote] = field(default_factory=list)
    signing_key: Path | None = None
    trusted_keys: Path | None = None
    pull: str = "lazy"
    remote_failures: str = "replay"
    #: amberd's own registry logins (an auth.json, see remote/credentials.py).
    registry_auth_file: Path | None = None


def parse_remote_url(text: Any) -> str:
    """``http(s)://HOST[:PORT]/REPOSITORY``, as a registry names a repository."""
    if not isinstance(text, str) or not _URL.match(text):
        raise CacheConfigError(
            f"expected http(s)://REGISTRY/REPOSITORY (lower-case repository), got {text!r}"
        )
    return text


def check_key_name(name: Any) -> str:
    if not isinstance(name, str) or not _KEY_NAME.match(name):
        raise CacheConfigError(f"a key name is letters, digits, '.', '_' or '-', got {name!r}")
    return name


def _remote(untrusted: Any) -> Remote:
    if not isinstance(untrusted, dict):
        raise CacheConfigError("each [[cache.remote]] is a table")
    unknown = set(untrusted) - {"url", "push", "trust"}
    if unknown:
        raise CacheConfigError(f"[[cache.remote]]: unknown option {sorted(unknown)[0]!r}")
    push = untrusted.get("push", False)
    trust = untrusted.get("trust", [])
    if not isinstance(push, bool):
        raise CacheConfigError("[[cache.remote]] push: expected true or false")
    if not isinstance(trust, list):
        raise CacheConfigError("[[cache.remote]] trust: expected a list of key names")
    try:
        return Remote(
            parse_remote_url(untrusted.get("url")), push, tuple(check_key_name(t) for t in trust)
        )
    except CacheConfigError as exc:
        raise CacheConfigError(f"[[cache.remote]]: {exc}") from None


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, str) or not Path(value).is_absolute():
        raise CacheConfigError(f"[cache] {name}: expected an absolute path, got {value!r}")
    return Path(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise CacheConfigError(
            f"[cache] {name}: expected one of {', '.join(choices)}, got {value!r}"
        )
    return value


def parse_cache(untrusted: Any) -> CacheConfig:
    """The ``cache`` table as read from TOML; every mistake names its option."""
    if not isinstance(untrusted, dict):
        raise CacheConfigError("option 'cache': expected a table ([cache], [[cache.remote]])")
    known = {"remote", "signing-key", "trusted-keys", "pull", "remote-failures",
             "registry-auth-file"}  # fmt: skip
    unknown = set(untrusted) - known
    if unknown:
        raise CacheConfigError(
            f"[cache]: unknown option {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})"
        )
    remotes = untrusted.get("remote", [])
    if not isinstance(remotes, list):
        raise CacheConfigError("[cache] remote: write each as [[cache.remote]]")
    config = CacheConfig(remotes=[_remote(r) for r in remotes])
    if "signing-key" in untrusted:
        config.signing_key = _path("signing-key", untrusted["signing-key"])
    if "trusted-keys" in untrusted:
        config.trusted_keys = _path("trusted-keys", untrusted["trusted-keys"])
    if "registry-auth-file" in untrusted:
        config.registry_auth_file = _path("registry-auth-file", untrusted["registry-auth-file"])
    config.pull = _choice("pull", untrusted.get("pull", "lazy"), PULL_CHOICES)
    config.remote_failures = _choice(
        "remote-failures", untrusted.get("remote-failures", "replay"), FAILURE_CHOICES
    )
    return config


EXAMPLE = """\
# The step cache shared with other hosts through an OCI registry (README:
# "Sharing a cache between hosts"). Remotes are asked in order after a local
# miss; results are pushed in the background to those with push = true.
# To use it, remove the "# " before each line of the tables below.
# [[cache.remote]]
# url = "http://127.0.0.1:5000/amber/trunk"   # registry + repository
# push = true                                  # this host writes here
# trust = ["ci-trunk-1", "ci-trunk-2"]         # key names whose signatures count (default: any trusted key)
# [cache]
# signing-key = "/etc/amber/signing-key"       # ed25519 private key (amber key generate); none: push nothing
# trusted-keys = "/etc/amber/trusted-keys"     # lines of NAME PUBLIC-KEY (amber key trust)
# pull = "lazy"                                # a hit's files come when a step, shell or export needs them; "eager": at once
# remote-failures = "replay"                   # or "retry": rebuild a failure found remotely
# registry-auth-file = "/run/credentials/amberd.service/amber-registry-auth"
#                                              # amberd's own logins (an auth.json: basic or token
#                                              # registries); root's, mode 0600 or 0400 (LoadCredential=)
"""


def to_toml(config: CacheConfig) -> str:
    """The table back as TOML (``amberd --print-config``)."""
    import json

    lines = []
    for r in config.remotes:
        lines += ["[[cache.remote]]", f"url = {json.dumps(r.url)}", f"push = {str(r.push).lower()}",
                  f"trust = {json.dumps(list(r.trust))}"]  # fmt: skip
    lines.append("[cache]")
    if config.signing_key:
        lines.append(f"signing-key = {json.dumps(str(config.signing_key))}")
    if config.trusted_keys:
        lines.append(f"trusted-keys = {json.dumps(str(config.trusted_keys))}")
    if config.registry_auth_file:
        lines.append(f"registry-auth-file = {json.dumps(str(config.registry_auth_file))}")
    lines += [
        f"pull = {json.dumps(config.pull)}",
        f"remote-failures = {json.dumps(config.remote_failures)}",
    ]
    return "\n".join(lines) + "\n"
