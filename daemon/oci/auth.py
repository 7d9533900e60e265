"""Registry authentication as the container tools do it: anonymous, basic, bearer token.

A registry answers 401 with ``WWW-Authenticate``. ``Basic`` means: send the
credentials with every request. ``Bearer realm=...,service=...,scope=...``
means: GET the realm with the service and scope (the credentials, if any, as
basic auth to the realm, as docker and podman send them), take the
``token`` (or ``access_token``) of its JSON answer and retry with
``Authorization: Bearer TOKEN``. Tokens are kept per scope for the client's
life (one request, one user); they are never logged or stored.

Credentials are one user's for one request: the ``amber`` client reads its
user's auth files (``client/registry_auth.py``) and sends the entry for the
registry host with the request (``auth`` on the wire, see ``wire_credentials``).
amberd never reads a user's files for them, and amberd's own credentials
(``registry-auth-file`` in amberd.toml) serve only its own pushes.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from amber.daemon.oci.errors import OciError, RegistryRefused

#: The most registries one request may carry credentials for (a base, a push target).
MAX_AUTH_ENTRIES = 8
_MAX_FIELD = 4096
#: A token answer is small JSON; a realm that sends more is not a token server.
MAX_TOKEN_ANSWER = 1 << 20
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or identity token) for one registry."""

    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    """What a 401's ``WWW-Authenticate`` asks for."""

    scheme: str  # "basic" or "bearer", lower case
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """``Bearer realm="https://auth",service="reg",scope="repository:a:pull"`` split up."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            break
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[match.group(1).lower()] = value
        pos = match.end()
    return Challenge(scheme.lower(), params)


def decode_auth_entry(entry: Any) -> Credentials | None:
    """One ``auths`` entry of an auth.json / docker config: ``auth`` is base64 of USER:PASS."""
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, colon, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return Credentials(user, password) if colon else None
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str):
        return Credentials(user, password)
    return None


def parse_auth_file(data: bytes) -> dict[str, Credentials]:
    """The ``auths`` of a containers auth.json or docker config.json, keyed by host.

    Keys such as ``https://index.docker.io/v1/`` or ``host/namespace`` are
    filed under their host; entries without inline credentials (a
    ``credsStore`` helper's) are left out. Raises ``ValueError`` if the file
    is not such JSON.
    """
    auths = json.loads(data).get("auths")
    if not isinstance(auths, dict):
        return {}
    out: dict[str, Credentials] = {}
    for key, entry in auths.items():
        host = _auth_key_host(str(key))
        found = decode_auth_entry(entry)
        if found is not None and host and (host not in out or key == host):
            out[host] = found
    return out


def _auth_key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``host/ns`` -> ``host``."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0]


def wire_credentials(value: Any) -> dict[str, Credentials]:
    """The ``auth`` argument of a request, checked: ``{HOST: {username, password}}``.

    Raises ``ValueError`` with a message that never quotes a password.
    """
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_AUTH_ENTRIES:
        raise ValueError(f"auth must map at most {MAX_AUTH_ENTRIES} registry hosts to credentials")
    out: dict[str, Credentials] = {}
    for host, entry in value.items():
        ok = isinstance(host, str) and 0 < len(host) <= 255 and isinstance(entry, dict)
        user = entry.get("username") if ok else None
        password = entry.get("password") if ok else None
        if not (isinstance(user, str) and isinstance(password, str)):
            raise ValueError(f"auth for {str(host)[:255]!r} needs a username and a password")
        if len(user) > _MAX_FIELD or len(password) > _MAX_FIELD:
            raise ValueError(f"auth for {host!r}: username or password too long")
        out[host] = Credentials(user, password)
    return out


def credentials_for(table: Mapping[str, Credentials], registry: str) -> Credentials | None:
    """The entry of ``table`` for ``registry`` (Docker Hub under any of its names)."""
    for name in host_aliases(registry):
        if name in table:
            return table[name]
    return None


def host_aliases(registry: str) -> tuple[str, ...]:
    """The names an auth file may file ``registry`` under."""
    hub = ("docker.io", "index.docker.io", "registry-1.docker.io")
    return hub if registry in hub else (registry,)


#: Fetches ``url`` with ``headers``: (status, body). Given by the registry client.
Fetch = Callable[[str, dict[str, str]], tuple[int, bytes]]


class Authenticator:
    """The ``Authorization`` a registry wants, learnt from its 401s."""

    def __init__(self, registry: str, credentials: Credentials | None, fetch: Fetch):
        self.registry = registry
        self.credentials = credentials
        self._fetch = fetch
        self._basic = False
        self._tokens: dict[str, str] = {}  # scope -> token
        self._by_repo: dict[str, str] = {}  # repository -> latest token covering it
        self._renewed: set[str] = set()  # scopes whose token was refused once

    def header(self, path: str) -> dict[str, str]:
        """What to send with a request for ``path`` before any 401."""
        if self._basic and self.credentials is not None:
            return {"Authorization": self.credentials.basic()}
        token = self._by_repo.get(_repository(path) or "")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def answer(self, www_authenticate: str | None, path: str, sent: dict[str, str]) -> bool:
        """Learn from a 401 for ``path``; True if a retry has a chance, else ``OciError``."""
        challenge = parse_challenge(www_authenticate)
        who = f"registry {self.registry}"
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            raise OciError(f"{who} requires authentication it does not describe")
        if challenge.scheme == "basic":
            if self.credentials is None:
                raise OciError(
                    f"{who} requires a login: no credentials for it (see `podman login`)"
                )
            if self._basic:
                raise RegistryRefused(
                    f"{who} refused the credentials of {self.credentials.username!r}"
                )
            self._basic = True
            return True
        scope = challenge.params.get("scope") or _default_scope(path)
        if sent.get("Authorization", "").startswith("Bearer ") and scope in self._tokens:
            if scope in self._renewed:
                raise RegistryRefused(f"{who} refused its own token for {scope}")
            self._renewed.add(scope)  # the token had expired, say: one new one
        token = self._token(challenge.params, scope)
        self._tokens[scope] = token
        for repo in [*_scope_repositories(scope), _repository(path)]:
            if repo:
                self._by_repo[repo] = token
        return True

    def _token(self, params: dict[str, str], scope: str) -> str:
        realm = params.get("realm")
        if not realm or urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise OciError(f"registry {self.registry} names no usable token realm ({realm!r})")
        query = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        status, body = self._fetch(url, headers)
        if status in (401, 403):
            if self.credentials is None:
                raise OciError(
                    f"registry {self.registry} requires a login for {scope}: no credentials for it"
                )
            raise RegistryRefused(
                f"registry {self.registry}: the token server refused the credentials of "
                f"{self.credentials.username!r} for {scope}"
            )
        if status != 200:
            raise OciError(f"registry {self.registry}: token server answered HTTP {status}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_ANSWER:
            raise OciError(f"registry {self.registry}: the token server sent no token")
        return token


def _repository(path: str) -> str | None:
    """The repository of a ``/v2/NAME/(blobs|manifests|tags)/...`` path."""
    match = re.match(r"^/v2/(.+?)/(?:blobs|manifests|tags)/", urllib.parse.urlsplit(path).path)
    return match.group(1) if match else None


def _default_scope(path: str) -> str:
    repo = _repository(path)
    return f"repository:{repo}:pull" if repo else "registry:catalog:*"


def _scope_repositories(scope: str) -> list[str]:
    """``repository:a/b:pull,push repository:c:pull`` -> ["a/b", "c"]."""
    out = []
    for part in scope.split():
        kind, _, rest = part.partition(":")
        name, _, _actions = rest.rpartition(":")
        if kind == "repository" and name:
            out.append(name)
    return out
