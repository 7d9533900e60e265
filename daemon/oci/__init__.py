"""OCI images: reading and writing layers, image layouts, archives and registries.

- ``tar``: tar headers and entries (reading and writing, no tarfile).
- ``gzip``: parallel gzip compression of layers.
- ``layer``: writing a layer from two trees.
- ``apply``: applying layers (whiteouts included) onto a tree.
- ``image``: exporting and reading whole images.
- ``source``: ``ImageSource`` and the one walk from an index to layers.
- ``archive``: OCI layouts and docker archives on disk.
- ``registry``: pushing and pulling through the registry HTTP API.
- ``limits``: what one import may unpack (``import-max-size``).
- ``spec``: image config, manifests, references, ``OciError`` (defined in ``errors``).
- ``base``: importing an OCI image as a build base.
- ``stream``: streaming a docker archive to a file descriptor.
"""
