"""``OciError``, alone: what the ``amber`` client's auth-file reading needs of the OCI code,
without the cost of importing the rest (``spec`` re-exports it for everything else)."""


class OciError(ValueError):
    """An image, archive, layer or registry answer amber will not accept."""


class RegistryRefused(OciError):
    """The registry said no for good (401/403 with our credentials, 405 read-only):
    asking again the same way cannot succeed, so a push queue drops it at once."""
