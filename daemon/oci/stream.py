"""A docker archive written front to back, for a pipe: ``amber export --to-engine``.

The file exports (oci.image) write each layer behind a placeholder header
and seek back to fill it in; a pipe cannot seek. Here each layer's size is
worked out from the trees first (``layer_size``, no blob read), so its header
can go first and its bytes stream straight through: nothing of the image is
held in memory or spooled to disk, however large it is.

The layout is ``docker save``'s with names of our own: ``layer-N.tar`` (a
layer's digest is known only once it is written), then the config (which
lists the layers' digests), then ``manifest.json`` naming them all with the
image's tag in ``RepoTags``. ``docker load`` and podman read the whole
archive before looking at ``manifest.json``, so the order is theirs to
accept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from amber.daemon.oci import tar as oci_tar
from amber.daemon.oci.layer import KnownLayer, LayerInfo, layer_size, write_layer
from amber.daemon.oci.spec import ImageConfig, OciError, digest_hex, rfc3339, sha256_digest
from amber.daemon.oci.tarstream import Copy
from amber.sandbox.store import Store

LayerSpec = tuple[bytes | None, bytes]


@dataclass(frozen=True)
class StreamResult:
    config_digest: str  # what docker calls the image id
    layers: int
    size: int  # bytes of the archive
    infos: list[LayerInfo] = field(default_factory=list)


def stream_docker_archive(
    store: Store,
    layers: Sequence[LayerSpec],
    config: ImageConfig,
    write: Callable[[bytes], object],
    *,
    tag: str | None,
    copy: Copy | None = None,
    known: Mapping[LayerSpec, KnownLayer] | None = None,
) -> StreamResult:
    """Write the docker archive of ``layers`` to ``write``, in order, never going back.

    ``write`` must take all it is given (a blocking file's write). On an
    error part of the archive has gone out: the reader must not take a
    truncated archive for a whole one (amber's client ends the upload only
    on the daemon's success). ``copy`` puts big files' content into the
    same output by the kernel; ``known`` diff_ids (``LayerDigests``) are
    used when the trees promise the size they were recorded with.
    """
    if not layers:
        raise ValueError("an image needs at least one layer")
    config = replace(config, created=config.created or rfc3339())
    counted = _Counted(write, copy)
    out = counted.write
    names: list[str] = []
    infos: list[LayerInfo] = []
    for i, (before, after) in enumerate(layers):
        size = layer_size(store, before, after)
        hint = (known or {}).get((before, after))
        name = f"layer-{i}.tar"
        out(oci_tar.header(name.encode(), b"0", size=size))
        info = write_layer(store, before, after, out, compression="none", copy=counted.copy,
                           known=hint if hint is not None and hint.size == size else None)  # fmt: skip
        if info.size != size:  # the header already went out: the archive is unusable
            raise OciError(
                f"layer {i} came to {info.size} bytes, not the {size} its trees promised"
            )
        out(oci_tar.padding(size))
        names.append(name)
        infos.append(info)
    config_blob = config.to_json([i.diff_id for i in infos])
    config_digest = sha256_digest(config_blob)
    config_name = f"{digest_hex(config_digest)}.json"
    manifest = [{"Config": config_name, "RepoTags": [tag] if tag else [], "Layers": names}]
    for name, data in (
        (config_name, config_blob),
        ("manifest.json", json.dumps(manifest, separators=(",", ":")).encode()),
    ):
        out(oci_tar.header(name.encode(), b"0", size=len(data)))
        out(data)
        out(oci_tar.padding(len(data)))
    out(oci_tar.END_OF_ARCHIVE)
    return StreamResult(config_digest, len(layers), counted.total, infos)


class _Counted:
    """The output, counting what goes through it, written or copied."""

    def __init__(self, write: Callable[[bytes], object], copy: Copy | None):
        self._write = write
        self._copy = copy
        self.copy = self._copied if copy is not None else None
        self.total = 0

    def write(self, data: bytes) -> None:
        self._write(data)
        self.total += len(data)

    def _copied(self, fd: int, size: int) -> None:
        assert self._copy is not None
        self._copy(fd, size)
        self.total += size
