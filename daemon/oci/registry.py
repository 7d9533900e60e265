"""Pushing and pulling images with the OCI distribution spec, on ``http.client``.

Plain HTTP for ``localhost``, ``127.0.0.1`` and ``[::1]`` or when asked
(``insecure``), HTTPS with certificate checks otherwise. Anonymous, basic
or bearer-token access: a 401 goes to ``auth.Authenticator``, which says
what to send on the retry (see ``oci/auth.py``).

Push builds each layer into a temporary file (its digest must be known
before the registry can be asked whether it has it), asks with ``HEAD`` and
uploads only what is missing, in one ``PUT`` or in ``PATCH`` chunks. An
optional ``layer_cache`` remembers the digest of a (before, after) layer so
a repeated push of the same base skips even building it. Every blob goes
through ``_send_unless_present`` and ``RegistryClient.upload``.

Pull is ``RegistrySource``: a registry as an ``ImageSource``, walked by
``source.resolve`` exactly as a local layout is.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  getaddrinfo's codec: at start, not in each first lookup
import http.client
import io
import json
import ssl
import tempfile
import urllib.parse
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from amber.daemon.oci.auth import MAX_TOKEN_ANSWER, Authenticator, Credentials
from amber.daemon.oci.errors import RegistryRefused
from amber.daemon.oci.layer import Compression, LayerInfo, write_layer
from amber.daemon.oci.source import ImageSource, resolve
from amber.daemon.oci.spec import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    ImageParts,
    OciError,
    Reference,
    check_digest,
    image_manifest,
    parse_reference,
    rfc3339,
    sha256_digest,
)
from amber.sandbox.store import Store

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
#: Docker Hub's registry name and where its API lives.
_ALIASES = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}


@dataclass
class PushStats:
    """What a push did: blobs the registry had, blobs sent, layers built."""

    blobs_skipped: int = 0
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0
    layers_built: int = 0


@dataclass
class _Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def is_plain_http(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    return host in LOCAL_HOSTS or registry in LOCAL_HOSTS


class RegistryClient:
    """One registry; one kept-alive connection for small requests."""

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        timeout: float = 120.0,
        credentials: Credentials | None = None,
    ):
        host = _ALIASES.get(registry, registry)
        self.scheme = "http" if insecure or is_plain_http(host) else "https"
        self.base = f"{self.scheme}://{host}"
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self.auth = Authenticator(registry, credentials, self._fetch_token)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- HTTP ---------------------------------------------------------------------

    def _connect(self, url: str) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            return http.client.HTTPSConnection(
                parts.netloc,
                timeout=self.timeout,
                context=ssl.create_default_context(),
                blocksize=1 << 20,
            )
        if parts.scheme != "http":
            raise OciError(f"registry sent an unsupported URL {url!r}")
        return http.client.HTTPConnection(parts.netloc, timeout=self.timeout, blocksize=1 << 20)

    def _url(self, target: str) -> str:
        return urllib.parse.urljoin(self.base + "/", target)

    def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | BinaryIO | None = None,
        headers: dict[str, str] | None = None,
        limit: int = MAX_DOCUMENT,
    ) -> _Answer:
        """One request, with the authorization the registry asked for (learnt on a 401)."""
        url = self._url(target)
        if not url.startswith(self.base + "/"):  # credentials go to the registry only
            return self._request_elsewhere(method, url, body, headers or {}, limit)
        path = url[len(self.base) :]
        for _ in range(3):  # anonymous, then with credentials or a token, then a renewed token
            sent = {**(headers or {}), **self.auth.header(path)}
            answer = self._send(method, path, body, sent, limit)
            if answer.status != 401:
                return answer
            self.auth.answer(answer.headers.get("WWW-Authenticate"), path, sent)
        return answer

    def _fetch_token(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """GET a token server's answer on a connection of its own (no redirects)."""
        parts = urllib.parse.urlsplit(url)
        conn = self._connect(url)
        try:
            conn.request(
                "GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers
            )
            resp = conn.getresponse()
            return resp.status, resp.read(MAX_TOKEN_ANSWER + 1)
        except OSError as exc:
            raise OciError(f"cannot reach the token server {parts.netloc}: {exc}") from None
        finally:
            conn.close()

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | BinaryIO | None,
        headers: dict[str, str],
        limit: int,
    ) -> _Answer:
        """One request on the kept-alive connection (retried once if it went stale)."""
        retryable = body is None or isinstance(body, bytes) or hasattr(body, "seek")
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._connect(self.base)
            try:
                if body is not None and not isinstance(body, bytes):
                    body.seek(0)
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read(limit + 1)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()  # a kept-alive connection the server had closed
                if attempt == 2 or not retryable:
                    raise OciError(f"{method} {self.base}{path}: {exc}") from None
                continue
            except OSError as exc:
                self.close()
                raise OciError(f"cannot reach registry {self.base}: {exc}") from None
            if len(data) > limit:
                self.close()
                raise OciError(f"{method} {path}: answer longer than {limit} bytes")
            if resp.will_close:
                self.close()
            return _Answer(resp.status, resp.headers, data)
        raise AssertionError("unreachable")

    def _request_elsewhere(
        self,
        method: str,
        url: str,
        body: bytes | BinaryIO | None,
        headers: dict[str, str],
        limit: int,
    ) -> _Answer:
        """A request to another host (an upload location behind a proxy, say)."""
        parts = urllib.parse.urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._connect(url)
        try:
            if body is not None and not isinstance(body, bytes):
                body.seek(0)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(limit + 1)
        except OSError as exc:
            raise OciError(f"{method} {url}: {exc}") from None
        finally:
            conn.close()
        if len(data) > limit:
            raise OciError(f"{method} {url}: answer longer than {limit} bytes")
        return _Answer(resp.status, resp.headers, data)

    @contextlib.contextmanager
    def stream(self, target: str, headers: dict[str, str] | None = None) -> Iterator[BinaryIO]:
        """GET ``target`` on a connection of its own, following redirects
        (registries often serve blobs from object storage); yields the body."""
        url = self._url(target)
        for _ in range(_MAX_REDIRECTS + 3):
            conn = self._connect(url)
            try:
                try:
                    parts = urllib.parse.urlsplit(url)
                    path = parts.path + (f"?{parts.query}" if parts.query else "")
                    # Never the registry's credentials to where it redirects (object storage).
                    ours = url.startswith(self.base + "/")
                    sent = {**(headers or {}), **(self.auth.header(path) if ours else {})}
                    conn.request("GET", path, headers=sent)
                    resp = conn.getresponse()
                    if resp.status == 401 and ours:
                        resp.read(MAX_DOCUMENT)
                        self.auth.answer(resp.getheader("WWW-Authenticate"), path, sent)
                        continue
                    if resp.status in _REDIRECTS:
                        location = resp.getheader("Location")
                        resp.read(MAX_DOCUMENT)
                        if not location:
                            raise OciError(f"GET {url}: redirect without a Location")
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if resp.status != 200:
                        raise _error(resp.status, resp.read(MAX_DOCUMENT), f"GET {url}")
                except OSError as exc:
                    raise OciError(f"GET {url}: {exc}") from None
                yield resp  # type: ignore[misc]
                return
            finally:
                conn.close()
        raise OciError(f"GET {target}: too many redirects")

    # -- blobs and manifests ---------------------------------------------------------

    def has_blob(self, name: str, digest: str) -> bool:
        answer = self.request("HEAD", f"/v2/{name}/blobs/{check_digest(digest)}")
        if answer.status == 200:
            return True
        if answer.status == 404:
            return False
        raise _error(answer.status, answer.body, f"HEAD blob {digest}")

    def upload(
        self,
        name: str,
        digest: str,
        body: bytes | Path,
        size: int,
        *,
        chunk_size: int | None = None,
        mount_from: Sequence[str] = (),
    ) -> bool:
        """Upload a blob (bytes, or the file at a path): POST, then one PUT, or
        PATCH chunks and a closing PUT. True when, instead, a repository of
        ``mount_from`` lent it (OCI cross-repository mount: nothing sent)."""
        location = self._start_upload(name, digest, mount_from)
        if location is None:
            return True
        octets = {"Content-Type": "application/octet-stream"}
        with io.BytesIO(body) if isinstance(body, bytes) else open(body, "rb") as f:
            if chunk_size is None:
                target = _with_query(location, digest=digest)
                headers = {**octets, "Content-Length": str(size)}
                answer = self.request("PUT", target, body=f, headers=headers)
            else:
                location = self._patch_chunks(location, digest, f, size, chunk_size)
                target = _with_query(location, digest=digest)
                answer = self.request("PUT", target, body=b"", headers={"Content-Length": "0"})
        if answer.status != 201:
            raise _error(answer.status, answer.body, f"finish upload of {digest}")
        return False

    def _start_upload(self, name: str, digest: str, mount_from: Sequence[str]) -> str | None:
        """An upload's location; None when a repository of ``mount_from`` lent the blob.

        ``POST ?mount=DIGEST&from=REPO`` answers 201 (mounted) or 202 (an
        upload begun instead, used if it is the last repository to ask,
        cancelled if not). Any other answer (a token without pull on REPO,
        a registry without mounts) is not an error: the blob is uploaded.
        """
        zero = {"Content-Length": "0"}
        for i, repo in enumerate(mount_from):
            query = urllib.parse.urlencode({"mount": digest, "from": repo})
            answer = self.request("POST", f"/v2/{name}/blobs/uploads/?{query}", headers=zero)
            if answer.status == 201:
                return None
            if answer.status != 202:
                break
            if i == len(mount_from) - 1:
                return _location(answer)
            self.request("DELETE", _location(answer))  # an unused upload: cancelled
        answer = self.request("POST", f"/v2/{name}/blobs/uploads/", headers=zero)
        if answer.status != 202:
            raise _error(answer.status, answer.body, f"start upload of {digest}")
        return _location(answer)

    def _patch_chunks(
        self, location: str, digest: str, f: BinaryIO, size: int, chunk_size: int
    ) -> str:
        """Send ``size`` bytes of ``f`` in PATCH requests; the location to finish at."""
        offset = 0
        while offset < size:
            f.seek(offset)
            chunk = f.read(min(chunk_size, size - offset))
            n = len(chunk)
            if n == 0:
                raise OciError(f"blob {digest} ended after {offset} of {size} bytes")
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(n),
                "Content-Range": f"{offset}-{offset + n - 1}",
            }
            answer = self.request("PATCH", location, body=chunk, headers=headers)
            if answer.status != 202:
                raise _error(answer.status, answer.body, f"upload chunk of {digest}")
            location = _location(answer)
            offset += n
        return location

    def put_manifest(self, name: str, reference: str, data: bytes, media_type: str) -> str:
        digest = sha256_digest(data)
        headers = {"Content-Type": media_type, "Content-Length": str(len(data))}
        answer = self.request(
            "PUT", f"/v2/{name}/manifests/{reference}", body=data, headers=headers
        )
        if answer.status not in (200, 201):
            raise _error(answer.status, answer.body, f"push manifest {name}:{reference}")
        said = answer.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise OciError(f"registry stored the manifest as {said}, expected {digest}")
        return digest

    def get_manifest(self, name: str, reference: str) -> tuple[bytes, str, str]:
        """The manifest or index: ``(bytes, media type, digest)``, digest checked."""
        answer = self.request(
            "GET", f"/v2/{name}/manifests/{reference}", headers={"Accept": ACCEPT}
        )
        if answer.status != 200:
            raise _error(answer.status, answer.body, f"manifest {name}:{reference}")
        digest = sha256_digest(answer.body)
        if reference.startswith("sha256:") and digest != reference:
            raise OciError(f"manifest {reference} does not match its digest")
        media_type = answer.headers.get("Content-Type", "").split(";")[0].strip()
        return answer.body, media_type, digest


def _location(answer: _Answer) -> str:
    location = answer.headers.get("Location")
    if not location:
        raise OciError("registry answered an upload without a Location")
    return location


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _error(status: int, body: bytes, what: str) -> OciError:
    """The error for an answer with ``status``, which it keeps (``.status``) for callers."""
    if status == 401:
        error: OciError = RegistryRefused(
            f"{what}: the registry refused the request (authentication)"
        )
    elif status == 403:
        error = RegistryRefused(f"{what}: the registry denied access (HTTP 403)")
    elif status == 405:
        error = RegistryRefused(
            f"{what}: HTTP 405 (the registry, or this repository, is read-only)"
        )
    else:
        detail = ""
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError, TypeError):
            errors = json.loads(body).get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        error = OciError(f"{what}: HTTP {status}" + (f" ({detail})" if detail else ""))
    error.status = status  # type: ignore[attr-defined]
    return error


def registry_target(ref: str) -> Reference:
    """``ref`` (``docker://`` or not) with Docker Hub's defaults filled in."""
    parsed = parse_reference(ref.removeprefix("docker://"))
    if not parsed.registry:
        parsed = replace(parsed, registry="docker.io")
    if parsed.registry in _ALIASES and "/" not in parsed.name:
        parsed = replace(parsed, name=f"library/{parsed.name}")
    return parsed


def push_image(
    store: Store,
    layers: Sequence[tuple[bytes | None, bytes]],
    config: ImageConfig,
    ref: str,
    insecure: bool = False,
    *,
    tmp_dir: Path | None = None,
    compression: Compression = "gzip",
    level: int = 1,
    chunk_size: int | None = None,
    layer_cache: MutableMapping[tuple, LayerInfo] | None = None,
    stats: PushStats | None = None,
    threads: int | None = None,
    credentials: Credentials | None = None,
) -> str:
    """Push the image made of ``layers`` to ``ref``; returns the manifest digest.

    Blobs the registry already has are not sent. ``tmp_dir`` holds the
    layer being built (one at a time). Layers are gzip level 1 by default:
    over a network the bytes saved pay for the compression.
    """
    target = registry_target(ref)
    if target.digest:
        raise OciError(f"push to a tag, not a digest: {ref}")
    if not layers:
        raise ValueError("an image needs at least one layer")
    stats = stats if stats is not None else PushStats()
    config = replace(config, created=config.created or rfc3339())
    client = RegistryClient(target.registry, insecure=insecure, credentials=credentials)
    try:
        infos: list[LayerInfo] = []
        with tempfile.TemporaryDirectory(prefix="amber-push-", dir=tmp_dir) as tmp:
            for i, (before, after) in enumerate(layers):
                key = (before or b"", after, compression, level)
                info = layer_cache.get(key) if layer_cache is not None else None
                if info is None or not client.has_blob(target.name, info.digest):
                    info = _build_and_send(
                        store, client, target.name, before, after, Path(tmp) / f"layer-{i}",
                        compression, level, chunk_size, stats, threads,
                    )  # fmt: skip
                    if layer_cache is not None:
                        layer_cache[key] = info
                else:
                    stats.blobs_skipped += 1
                infos.append(info)
        config_blob = config.to_json([i.diff_id for i in infos])
        manifest, manifest_blob = image_manifest(
            config_blob, [i.descriptor() for i in infos], config.created
        )
        digest = manifest.config.digest
        _send_unless_present(client, target.name, digest, config_blob, len(config_blob), stats)
        return client.put_manifest(target.name, target.tag or "latest", manifest_blob, OCI_MANIFEST)
    finally:
        client.close()


def _build_and_send(
    store: Store,
    client: RegistryClient,
    name: str,
    before: bytes | None,
    after: bytes,
    path: Path,
    compression: Compression,
    level: int,
    chunk_size: int | None,
    stats: PushStats,
    threads: int | None,
) -> LayerInfo:
    try:
        with open(path, "wb", buffering=1 << 20) as f:
            info = write_layer(
                store, before, after, f, compression=compression, level=level, threads=threads
            )
        stats.layers_built += 1
        _send_unless_present(client, name, info.digest, path, info.size, stats, chunk_size)
        return info
    finally:
        path.unlink(missing_ok=True)


def _send_unless_present(
    client: RegistryClient,
    name: str,
    digest: str,
    body: bytes | Path,
    size: int,
    stats: PushStats,
    chunk_size: int | None = None,
) -> None:
    """Upload a blob the registry does not have yet; count what was done."""
    if client.has_blob(name, digest):
        stats.blobs_skipped += 1
        return
    client.upload(name, digest, body, size, chunk_size=chunk_size)
    stats.blobs_uploaded += 1
    stats.bytes_uploaded += size


class RegistrySource(ImageSource):
    """One repository of a registry as an image source: manifests by
    reference or digest, blobs streamed on connections of their own."""

    def __init__(self, client: RegistryClient, target: Reference):
        self.client = client
        self.target = target
        self.name = str(target)

    def top(self) -> tuple[bytes, str, str | None]:
        return self.client.get_manifest(self.target.name, self.target.reference)

    def document(self, desc: Descriptor) -> tuple[bytes, str]:
        data, media_type, _ = self.client.get_manifest(self.target.name, desc.digest)
        return data, media_type

    def blob(self, desc: Descriptor) -> AbstractContextManager[BinaryIO]:
        return self.client.stream(f"/v2/{self.target.name}/blobs/{check_digest(desc.digest)}")


@contextlib.contextmanager
def open_remote(
    ref: str, *, insecure: bool = False, credentials: Credentials | None = None
) -> Iterator[ImageParts]:
    """The image at ``ref`` in a registry, layers streamed when applied."""
    target = registry_target(ref)
    client = RegistryClient(target.registry, insecure=insecure, credentials=credentials)
    try:
        yield resolve(RegistrySource(client, target))
    finally:
        client.close()
