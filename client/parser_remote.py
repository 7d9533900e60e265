"""``amber push``, ``amber pull`` and ``amber key``'s arguments: the remote cache by hand (README: Sharing a cache).

A module of its own beside parser.py, which declares every other command.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_PUSH = """\
Push every step result of BUILD (successes and failures; errored steps have
none) to amberd's [[cache.remote]] entries with push = true, or to --to URL,
signed with amberd's signing key. amberd already does this in the background
after each step; this is for a push it gave up on or a remote added since.
What the registry has is not sent again: a result already there is skipped,
blobs another configured repository of the same registry has are mounted."""

_PULL = """\
Fetch from the remote cache, verified (signature, sha256 and BLAKE3 digests),
every result of BUILD (a build of yours, whose states are missing here) or
the result of the step key KEY (amber show BUILD lists them), with
everything it needs, into amberd's store: later builds find them locally,
and shell, diff and export work offline. Remotes are asked in order.
A pulled result is an ordinary cache entry: gc may collect it unless pinned."""

_URL = "(http(s)://REGISTRY/REPOSITORY)"


def add_remote(commands: Any) -> None:
    """Declare ``push`` and ``pull`` on parser.py's ``_Commands``."""
    sub = commands.add("push", "remote.cmd_push", "push a build's results to the remote cache now",
                       _PUSH, json=True, epilog="exit status: 0 every result is on the remote, 1 "
                       "one failed (its error is printed;\nafter a failure the remaining ones to "
                       "that remote are not tried)")  # fmt: skip
    sub.add_argument("build", metavar="BUILD", help="a build of yours (see amber builds)")
    sub.add_argument("--to", metavar="URL", help=f"push here {_URL} instead")
    sub = commands.add("pull", "remote.cmd_pull", "bring results from the remote cache into the "
                       "store", _PULL, json=True, epilog="exit status: 0 everything is in the "
                       "store, 1 a result was not found or\ndid not verify (its reason is printed)")  # fmt: skip
    sub.add_argument("target", metavar="BUILD|KEY", help="a build id or a 64-digit step key")
    sub.add_argument("--from", dest="source", metavar="URL",
                     help=f"pull from this remote {_URL} of amberd's list only (another "
                     "URL: root and the admin-group)")  # fmt: skip


def add_keys(commands: Any) -> None:
    """``amber key generate|trust``: the signing keys a remote cache's results carry."""
    keys = commands.group_of("key", "signing keys for a remote cache: generate, trust")
    sub = keys.add(
        "generate",
        "keys.cmd_key_generate",
        "write an ed25519 key pair",
        "Write NAME.key (the private key, 0600: amberd.toml's signing-key) and NAME.pub\n"
        "in DIR, and print the public key line to give to `amber key trust` on other hosts.",
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--dir", default=".", metavar="DIR", help="where to write (default: .)")
    sub = keys.add(
        "trust",
        "keys.cmd_key_trust",
        "trust a host's public key",
        "Add NAME PUBKEY to the trusted-keys file (amberd.toml's trusted-keys).",
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("pubkey", metavar="PUBKEY")
    sub.add_argument(
        "--file",
        default="/etc/amber/trusted-keys",
        metavar="PATH",
        help="the trusted-keys file (default: /etc/amber/trusted-keys)",
    )
