"""OCI vocabulary shared by export, push and import: media types, the error
type, image configs, manifests and digest strings.

Everything that comes from an archive or a registry is untrusted: digests
are checked for shape before they name a file, JSON documents for type
before their fields are used.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

OCI_LAYOUT = "application/vnd.oci.image.layout.v1"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CREATED = "org.opencontainers.image.created"
#: containerd and podman read the full image name from this annotation.
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"

#: Manifests, indexes and configs are small; anything bigger is hostile.
MAX_DOCUMENT = 8 << 20

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}  # fmt: skip
# Distribution spec reference grammar (simplified: lowercase path components).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class OciError(ValueError):
    """An image, archive, layer or registry answer amber will not accept."""


class RegistryRefused(OciError):
    """The registry said no for good (401/403 with our credentials, 405 read-only):
    asking again the same way cannot succeed, so a push queue drops it at once."""


def machine_architecture() -> str:
    """This machine's architecture as OCI names it (amd64, arm64, ...)."""
    machine = platform.machine()
    return _ARCH.get(machine, machine)


def check_digest(value: object) -> str:
    """``value`` if it is a ``sha256:<64 hex>`` digest, else ``OciError``.

    Digests from archives name files and URLs, so their shape is checked
    before they are used (``sha256:../../etc`` must never become a path).
    """
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise OciError(f"unsupported or malformed digest {value!r} (only sha256 is accepted)")
    return value


def digest_hex(digest: str) -> str:
    return check_digest(digest)[len("sha256:") :]


def rfc3339(seconds: float | None = None) -> str:
    t = time.time() if seconds is None else seconds
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class ImageConfig:
    """The parts of an image config amber writes and reads back."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    cmd: list[str] = field(default_factory=lambda: ["/bin/sh"])
    labels: dict[str, str] = field(default_factory=dict)
    created: str | None = None  # RFC 3339; None means now
    architecture: str = field(default_factory=machine_architecture)
    os: str = "linux"
    #: one line per layer for ``podman history`` (``created_by``); optional
    history: list[str] = field(default_factory=list)

    def to_json(self, diff_ids: list[str]) -> bytes:
        """The config blob, with the layers' uncompressed digests."""
        created = self.created or rfc3339()
        inner: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in self.env.items()]}
        if self.cmd:
            inner["Cmd"] = list(self.cmd)
        if self.workdir:
            inner["WorkingDir"] = self.workdir
        if self.labels:
            inner["Labels"] = dict(self.labels)
        comments = self.history or [f"amber layer {i}" for i in range(len(diff_ids))]
        if len(comments) != len(diff_ids):
            raise ValueError(f"{len(comments)} history lines for {len(diff_ids)} layers")
        doc = {
            "created": created,
            "architecture": self.architecture,
            "os": self.os,
            "config": inner,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [{"created": created, "created_by": c} for c in comments],
        }
        return canonical_json(doc)

    @classmethod
    def from_json(cls, data: bytes) -> tuple[ImageConfig, list[str]]:
        """Parse an untrusted config blob; returns the config and its diff_ids."""
        doc = parse_json(data, "image config")
        inner = doc.get("config") or {}
        rootfs = doc.get("rootfs") or {}
        if not isinstance(inner, dict) or not isinstance(rootfs, dict):
            raise OciError("image config: 'config' and 'rootfs' must be objects")
        diff_ids = [
            check_digest(d) for d in _list_of(rootfs.get("diff_ids") or [], str, "diff_ids")
        ]
        env: dict[str, str] = {}
        for item in _list_of(inner.get("Env") or [], str, "Env"):
            key, _, value = item.partition("=")
            if key:
                env[key] = value
        labels = inner.get("Labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise OciError("image config: Labels must map strings to strings")
        history = [
            str(h.get("created_by", ""))
            for h in _list_of(doc.get("history") or [], dict, "history")
            if not h.get("empty_layer")
        ]
        config = cls(
            env=env,
            workdir=_str(inner.get("WorkingDir"), "WorkingDir"),
            cmd=_list_of(inner.get("Cmd") or [], str, "Cmd"),
            labels=dict(labels),
            created=_str(doc.get("created"), "created") or None,
            architecture=_str(doc.get("architecture"), "architecture"),
            os=_str(doc.get("os"), "os") or "linux",
            history=history if len(history) == len(diff_ids) else [],
        )
        return config, diff_ids


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: media type, digest, size (and annotations)."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = dict(self.platform)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    @classmethod
    def from_dict(cls, d: object, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise OciError(f"{what}: a descriptor must be an object")
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OciError(f"{what}: bad size {size!r}")
        annotations = d.get("annotations") or {}
        plat = d.get("platform") or {}
        if not isinstance(annotations, dict) or not isinstance(plat, dict):
            raise OciError(f"{what}: annotations and platform must be objects")
        return cls(
            media_type=_str(d.get("mediaType"), "mediaType"),
            digest=check_digest(d.get("digest")),
            size=size,
            annotations={str(k): str(v) for k, v in annotations.items()},
            platform={str(k): str(v) for k, v in plat.items()},
        )


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    media_type: str = OCI_MANIFEST
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return canonical_json(doc)

    @classmethod
    def from_json(cls, data: bytes, media_type: str | None = None) -> Manifest:
        doc = parse_json(data, "manifest")
        kind = doc.get("mediaType") or media_type or OCI_MANIFEST
        if kind in INDEX_TYPES or "manifests" in doc:
            raise OciError("expected an image manifest, got an index")
        if kind not in MANIFEST_TYPES or doc.get("schemaVersion") != 2:
            raise OciError(f"unsupported manifest type {kind!r}")
        layers = [
            Descriptor.from_dict(d, f"layer {i}")
            for i, d in enumerate(_list_of(doc.get("layers") or [], dict, "layers"))
        ]
        for layer in layers:
            if layer.media_type not in LAYER_TYPES:
                raise OciError(f"unsupported layer media type {layer.media_type!r}")
        return cls(Descriptor.from_dict(doc.get("config"), "config"), layers, kind)


def image_manifest(
    config_blob: bytes, layers: list[Descriptor], created: str | None = None
) -> tuple[Manifest, bytes]:
    """The manifest of an image made of ``layers`` and ``config_blob``, and its bytes."""
    config = Descriptor(OCI_CONFIG, sha256_digest(config_blob), len(config_blob))
    annotations = {ANNOTATION_CREATED: created} if created else {}
    manifest = Manifest(config, list(layers), annotations=annotations)
    return manifest, manifest.to_json()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def index_json(manifests: Iterable[Descriptor]) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [m.to_dict() for m in manifests],
        }
    )


def parse_index(data: bytes) -> list[Descriptor]:
    doc = parse_json(data, "image index")
    return [
        Descriptor.from_dict(d, f"index entry {i}")
        for i, d in enumerate(_list_of(doc.get("manifests") or [], dict, "manifests"))
    ]


def is_index(data: bytes, media_type: str = "") -> bool:
    """Whether ``data`` is an image index (or docker manifest list).

    Decided by the document itself, the same for every source: one with a
    ``manifests`` list is an index, one with ``layers`` or ``config`` is a
    manifest, whatever media type its descriptor or the server gave it;
    only a document with neither goes by its ``mediaType``, then by
    ``media_type`` (what the source called it).
    """
    doc = parse_json(data, "manifest or index")
    if "manifests" in doc:
        return True
    if "layers" in doc or "config" in doc:
        return False
    return (doc.get("mediaType") or media_type) in INDEX_TYPES


def pick_manifest(entries: list[Descriptor], tag: str | None = None) -> Descriptor:
    """The entry an import should use: by tag, else this machine's platform."""
    if tag is not None:
        named = [
            e
            for e in entries
            if tag
            in (e.annotations.get(ANNOTATION_REF_NAME), e.annotations.get(ANNOTATION_IMAGE_NAME))
        ]
        if not named:
            raise OciError(f"no image tagged {tag!r} in the index")
        entries = named
    if len(entries) == 1:
        return entries[0]
    arch = machine_architecture()
    for e in entries:
        if e.platform.get("architecture") == arch and e.platform.get("os", "linux") == "linux":
            return e
    if not entries:
        raise OciError("the index lists no images")
    raise OciError(f"the index lists {len(entries)} images and none for linux/{arch}")


def canonical_json(doc: object) -> bytes:
    """Compact, key-sorted JSON: the same document always has the same digest."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT:
        raise OciError(f"{what} is {len(data)} bytes, more than {MAX_DOCUMENT}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OciError(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OciError(f"{what} must be a JSON object")
    return doc


def _str(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise OciError(f"{what} must be a string")
    return value


def _list_of(value: object, kind: type, what: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise OciError(f"{what} must be a list of {kind.__name__}")
    return list(value)


@dataclass(frozen=True)
class Reference:
    """``[registry/]name[:tag][@digest]`` split into its parts."""

    registry: str  # host[:port]; "" for a local name
    name: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.name}" if self.registry else self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse an image reference; ``OciError`` when it is not one."""
    rest, _, digest = text.partition("@")
    if digest:
        check_digest(digest)
    registry = ""
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, rest = first, remainder
    name, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not _NAME.fullmatch(name) or len(name) > 255:
        raise OciError(f"{text!r} is not a valid image reference (name {name!r})")
    if colon and not _TAG.fullmatch(tag):
        raise OciError(f"{text!r} is not a valid image reference (tag {tag!r})")
    return Reference(registry, name, tag or None, digest or None)


def qualified_name(ref: str) -> str:
    """``ref`` with a registry part: ``localhost/`` when it had none.

    Docker and podman both accept ``localhost/NAME:TAG`` and show it as is,
    so a loaded export has the same name in both.
    """
    parsed = parse_reference(ref)
    if parsed.registry:
        return str(parsed)
    return f"localhost/{parsed}" if parsed.tag else f"localhost/{parsed}:latest"


def display_reference(ref: str) -> str:
    """``ref`` if valid, else the nearest valid one (a name only shown to users)."""
    try:
        parse_reference(ref)
    except OciError:
        name, colon, tag = ref.rpartition(":")
        if not colon or "/" in tag:
            name, tag = ref, "latest"
        return make_reference(name, tag)
    return ref


def make_reference(name: str, tag: str) -> str:
    """A valid ``name:tag`` from arbitrary build and step names."""
    clean_name = re.sub(r"[^a-z0-9._/-]+", "-", name.lower())
    clean_name = re.sub(r"[._-]{2,}", "-", clean_name)
    clean_name = "/".join(
        re.sub(r"^[^a-z0-9]+|[^a-z0-9]+$", "", part) or "x" for part in clean_name.split("/")
    )
    clean_tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", tag).lstrip(".-")[:128] or "latest"
    return f"{clean_name}:{clean_tag}"


@dataclass
class LayerBlob:
    """One layer as a source offers it, opened only when it is applied."""

    media_type: str
    digest: str | None  # sha256 of the blob; None when the source does not say
    size: int | None
    open: Callable[[], AbstractContextManager[BinaryIO]]


@dataclass
class ImageParts:
    """An image found in an archive, a layout or a registry, not yet applied."""

    config: bytes  # already checked against its digest where one was given
    layers: list[LayerBlob]
    name: str | None = None
    manifest_digest: str | None = None
