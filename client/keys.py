"""Signing keys for remote caches: ``amber key generate`` and ``amber key trust``.

Both run without amberd: they only write files root then names in
amberd.toml (``signing-key``, ``trusted-keys``). The private key is PEM
(PKCS#8, 0600), the public key one line of base64 of its 32 raw bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def public_text(private: Ed25519PrivateKey) -> str:
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw).decode()


def parse_public(text: str) -> Ed25519PublicKey:
    """A public key as ``public_text`` writes it; ValueError otherwise."""
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not an ed25519 public key (base64 of 32 bytes): {exc}") from None


def generate(name: str, directory: Path) -> tuple[Path, str]:
    """Write ``NAME.key`` (0600, never over an existing file) and ``NAME.pub``; the public key."""
    if not KEY_NAME.match(name):
        raise ValueError(f"a key name is letters, digits, '.', '_' or '-', got {name!r}")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    path = directory / f"{name}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = public_text(private)
    (directory / f"{name}.pub").write_text(f"{name} {public}\n")
    return path, public


def trust(name: str, public: str, path: Path) -> None:
    """Add (or replace) ``NAME PUBLIC-KEY`` in the trusted-keys file at ``path``."""
    if not KEY_NAME.match(name):
        raise ValueError(f"a key name is letters, digits, '.', '_' or '-', got {name!r}")
    parse_public(public)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    kept = [line for line in lines if line.split("#", 1)[0].split()[:1] != [name]]
    path.write_text("\n".join([*kept, f"{name} {public.strip()}"]) + "\n", encoding="utf-8")
