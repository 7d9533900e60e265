"""Which tree a registry image became, per user: bases are pulled once.

A row is written only by amberd, after it pulled and verified the image
for that user (every document and blob against its sha256, every layer
against the config's diff_ids), and is read only for that same user. So a
user never reaches another user's private image by naming its reference
or digest (they must pull it with their own credentials; the store then
shares the content-addressed objects), and no user can make amberd
believe a digest means another tree for somebody else: there is no row of
theirs to poison.

Pulls run on worker threads while the trio thread uses the daemon's
connection (a transaction there must not take in a statement of ours), so
each call here opens a connection of its own, as ``complete.py`` keeps one.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pulled:
    registry: str
    repository: str
    digest: str  # what the reference named (a manifest or an index)
    manifest: str  # the image manifest used (this platform's)
    tree: str  # hex
    tag: str | None = None  # the tag it was pulled by, if any


@contextlib.contextmanager
def _connection(db_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        yield conn
    finally:
        conn.close()


def find_pulled(
    db_path: Path, uid: int, registry: str, repository: str, digest: str
) -> Pulled | None:
    """``uid``'s own record of ``registry/repository@digest``, never another user's."""
    row = _row(db_path, "SELECT manifest, tree FROM pulled_bases WHERE uid = ? AND registry = ? "
               "AND repository = ? AND digest = ?", (uid, registry, repository, digest))  # fmt: skip
    return Pulled(registry, repository, digest, row[0], row[1]) if row else None


def record_pulled(db_path: Path, uid: int, pulled: Pulled) -> None:
    """Remember, for ``uid`` only, what ``pulled`` names (replacing an older record)."""
    with _connection(db_path) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO pulled_bases "
            "(uid, registry, repository, digest, manifest, tree, tag, pulled) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (uid, pulled.registry, pulled.repository, pulled.digest, pulled.manifest,
             pulled.tree, pulled.tag, time.time()),
        )  # fmt: skip


def find_tag(db_path: Path, uid: int, registry: str, repository: str, tag: str) -> str | None:
    """The digest ``uid`` last pulled ``registry/repository:tag`` as, if any."""
    row = _row(db_path, "SELECT digest FROM pulled_bases WHERE uid = ? AND registry = ? AND "
               "repository = ? AND tag = ? ORDER BY pulled DESC LIMIT 1",
               (uid, registry, repository, tag))  # fmt: skip
    return row[0] if row else None


def _row(db_path: Path, query: str, params: tuple) -> tuple | None:
    with _connection(db_path) as conn:
        return conn.execute(query, params).fetchone()
