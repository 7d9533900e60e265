"""``oci:PATH`` bases: an image archive or layout becomes a tree.

The image is applied layer by layer with its whiteouts (see ``oci.apply``)
and only its final tree is kept as the base.
"""

from __future__ import annotations

from pathlib import Path

from amber.daemon.oci.apply import Devices
from amber.daemon.oci.image import read_image
from amber.daemon.oci.limits import MAX_IMPORT
from amber.sandbox.asuser import UserReader
from amber.sandbox.store import Store


def import_oci_base(
    store: Store,
    path: Path | str,
    *,
    tag: str | None = None,
    devices: Devices = "refuse",
    max_size: int = MAX_IMPORT,
    reader: UserReader | None = None,
) -> bytes:
    """The root tree digest of the image at ``path`` (layout, OCI or docker archive).

    Raises ``OciError`` (a ``ValueError``) for anything that is not an image
    amber accepts; the store then gains no tree. ``devices="drop"`` leaves out
    device nodes instead of refusing the image (``podman import`` of a
    debootstrap root has ``/dev/null``; steps get amber's ``/dev`` anyway).
    """
    image = read_image(
        Path(path), store, tag=tag, devices=devices, max_size=max_size, reader=reader
    )
    return image.trees[-1]
