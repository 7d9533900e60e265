"""Signatures over results: ed25519 (``cryptography``) on amber's own fingerprint.

The fingerprint binds a step key to the digest of the config blob that
names the result (status, trees, log by BLAKE3): whoever can write to the
registry but holds no trusted key cannot make a key mean another result.
Layers need no signature: everything in them is checked against the
BLAKE3 digests the signed config names.

Key files: the private key in PEM (PKCS#8), the public key as one line of
base64 of its 32 raw bytes; ``trusted-keys`` holds lines ``NAME PUBLIC-KEY``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from amber.client.keys import generate, parse_public, public_text

__all__ = ["generate", "parse_public", "public_text"]

_DOMAIN = b"amber step result v1\0"


class TrustError(ValueError):
    """A key file that cannot be read or parsed."""


def fingerprint(key: str, config_digest: str) -> bytes:
    return _DOMAIN + key.encode() + b"\0" + config_digest.encode()


@dataclass(frozen=True)
class SigningKey:
    name: str
    private: Ed25519PrivateKey

    def sign(self, key: str, config_digest: str) -> str:
        return base64.b64encode(self.private.sign(fingerprint(key, config_digest))).decode()

    def verifies(
        self, key: str, config_digest: str, signer: str | None, signature: str | None
    ) -> bool:
        """Whether ``signature`` is this key's own over (key, config digest)."""
        trusted = {self.name: self.private.public_key()}
        return check(trusted, (), signer, signature, key, config_digest) is None


def warm() -> None:
    """Sign and check once at daemon start: the first ed25519 use of a process sets up its
    backend (about 1 ms), which the first remote lookup of a fresh daemon paid."""
    private = Ed25519PrivateKey.generate()
    parse_public(public_text(private))
    signer = SigningKey("warm-up", private)
    signer.verifies("k", "d", signer.name, signer.sign("k", "d"))


def load_signing_key(path: Path) -> SigningKey:
    """The private key at ``path``; its name is the file's stem (``ci-1.key``: ``ci-1``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustError(f"signing-key {path}: {exc.strerror or exc}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"signing-key {path}: not a PEM private key: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise TrustError(f"signing-key {path}: not an ed25519 key")
    return SigningKey(path.name.removesuffix(".key"), private)


def load_trusted(path: Path | None) -> dict[str, Ed25519PublicKey]:
    """``NAME PUBLIC-KEY`` lines (``#`` comments); a bad line is an error naming it."""
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustError(f"trusted-keys {path}: {exc}") from None
    keys: dict[str, Ed25519PublicKey] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TrustError(f"trusted-keys {path}:{n}: expected NAME PUBLIC-KEY")
        try:
            keys[parts[0]] = parse_public(parts[1])
        except ValueError as exc:
            raise TrustError(f"trusted-keys {path}:{n}: {exc}") from None
    return keys


def check(
    trusted: dict[str, Ed25519PublicKey],
    allowed: tuple[str, ...],
    signer: str | None,
    signature: str | None,
    key: str,
    config_digest: str,
) -> str | None:
    """Why this signature does not count (None: it does)."""
    if not signer or not signature:
        return "it is not signed"
    if allowed and signer not in allowed:
        return f"its signer {signer!r} is not trusted for this remote"
    public = trusted.get(signer)
    if public is None:
        return f"its signer {signer!r} is not a trusted key"
    try:
        public.verify(base64.b64decode(signature, validate=True), fingerprint(key, config_digest))
    except (InvalidSignature, binascii.Error, ValueError):
        return f"its signature by {signer!r} is wrong"
    return None
