"""Where an image comes from: one walk from its index to its layers, for every source.

An OCI layout (a directory or an archive) and a registry differ only in how
they hand out documents and blobs; ``ImageSource`` is that difference.
``resolve`` does the rest once for all of them: what counts as an index
(``spec.is_index``, by the document's content, whatever its descriptor or
the server calls it), which entry of a multi-platform index this machine
uses (``spec.pick_manifest``), how deep indexes may nest, and that every
document read matches the digest and size that named it (``verified``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from functools import partial
from typing import BinaryIO

from amber.daemon.oci.spec import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    MAX_DOCUMENT,
    Descriptor,
    ImageParts,
    LayerBlob,
    Manifest,
    OciError,
    is_index,
    parse_index,
    pick_manifest,
    sha256_digest,
)

#: An index may point at an index (a tag at a multi-platform index), but not forever.
MAX_NESTING = 4


class ImageSource(ABC):
    """A place images are read from: its first document, then documents and blobs by digest."""

    #: the image's name when the source knows it (a registry reference)
    name: str | None = None

    @abstractmethod
    def top(self) -> tuple[bytes, str, str | None]:
        """The document to start from: its bytes, the media type the source
        gives it ("" when it says none) and its digest when the source names
        it by one (already checked)."""

    @abstractmethod
    def document(self, desc: Descriptor) -> tuple[bytes, str]:
        """The manifest or index ``desc`` names, unverified, and the media type the source gives."""

    @abstractmethod
    def blob(self, desc: Descriptor) -> AbstractContextManager[BinaryIO]:
        """The bytes of blob ``desc``, as a stream (checked by whoever reads them)."""

    def has_blob(self, desc: Descriptor) -> bool:
        """Whether the blob is there; sources that cannot tell cheaply say yes."""
        return True

    def small_blob(self, desc: Descriptor) -> bytes:
        """A config blob, read whole and verified."""
        if desc.size > MAX_DOCUMENT:
            raise OciError(f"blob {desc.digest} is too large to be a config ({desc.size} bytes)")
        with self.blob(desc) as stream:
            data = stream.read(desc.size + 1)
        return verified(data, desc)


def verified(data: bytes, desc: Descriptor) -> bytes:
    """``data`` if it has the size and digest ``desc`` gives, else ``OciError``."""
    if len(data) != desc.size or sha256_digest(data) != desc.digest:
        raise OciError(f"blob {desc.digest} does not match its digest or size")
    return data


def resolve(source: ImageSource, tag: str | None = None) -> ImageParts:
    """The image ``source`` offers: by ``tag`` among the first index's entries,
    else this machine's platform; nested indexes followed."""
    data, media_type, digest = source.top()
    name = source.name
    for depth in range(MAX_NESTING + 1):
        if not is_index(data, media_type):
            break
        if depth == MAX_NESTING:
            raise OciError(f"indexes nested more than {MAX_NESTING} deep")
        entry = pick_manifest(parse_index(data), tag if depth == 0 else None)
        if depth == 0 and name is None:
            annotations = entry.annotations
            name = annotations.get(ANNOTATION_IMAGE_NAME) or annotations.get(ANNOTATION_REF_NAME)
        data, media_type = source.document(entry)
        verified(data, entry)
        digest = entry.digest
    manifest = Manifest.from_json(data, media_type or None)
    config = source.small_blob(manifest.config)
    layers = []
    for desc in manifest.layers:
        if not source.has_blob(desc):
            raise OciError(f"layer {desc.digest} is missing from the image")
        layers.append(
            LayerBlob(desc.media_type, desc.digest, desc.size, partial(source.blob, desc))
        )
    return ImageParts(config, layers, name, digest)
