"""The daemon's metadata: results, builds, images, pins, out-links (SQLite, WAL).

Objects live in the CAS (``amber.sandbox.store``); this database holds what
refers to them. SQLite gives atomic, crash-safe updates for free. Every
write is a short transaction; the daemon is one process and calls in from
the trio thread, so no locking beyond SQLite's own is needed. GC and fsck,
which read everything, open their own connection in their worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amber.daemon.storage.schema import create_or_migrate


@dataclass
class Result:
    key: str
    status: str
    exit_code: int | None
    signal: int | None
    before_tree: str
    after_tree: str
    log: str
    started: float
    seconds: float
    host: str
    build_id: str
    step: str


@dataclass(frozen=True)
class RemoteRecord:
    """Where a result found in a remote cache lives: its closure may not be here."""

    url: str
    manifest_digest: str
    manifest: bytes


@dataclass
class BuildRecord:
    id: str
    seq: int
    uid: int
    name: str
    spec: str
    spec_path: str
    status: str
    frozen: int = 0
    created: float = field(default_factory=time.time)
    finished: float | None = None
    failed_step: str | None = None
    base_tree: str | None = None
    final_tree: str | None = None
    error: str | None = None
    base_owner: int | None = None  # whose image ``base`` named (None: not an image)
    base_digest: str | None = None  # a docker:// base: the digest its reference resolved to
    phases: str | None = None  # JSON: seconds per phase outside the steps (build/phases.py)

    @property
    def base(self) -> str:
        """The base as the spec spells it (``spec`` is ``Spec.to_dict()`` as JSON)."""
        return json.loads(self.spec).get("build", {}).get("base", "host")


@dataclass
class Pin:
    name: str
    kind: str
    target: str
    uid: int
    created: float
    roots: str  # JSON, see pins.PinRoots

    def roots_dict(self) -> dict:
        return json.loads(self.roots)


@dataclass
class OutLink:
    path: str
    build_id: str
    tree: str
    uid: int
    dev: int
    ino: int
    created: float


@dataclass
class StepRecord:
    build_id: str
    idx: int
    name: str
    key: str | None
    status: str
    exit_code: int | None = None
    signal: int | None = None
    seconds: float | None = None
    before_tree: str | None = None
    after_tree: str | None = None
    log: str | None = None
    definition: str = "{}"
    note: str | None = None
    started: float | None = None
    phases: str | None = None  # JSON: seconds per phase of running it here (build/phases.py)


def _root_only(path: Path) -> None:
    """The database and its -wal/-shm files 0600: every spec and its env is in there."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if name.stat().st_mode & 0o077:
                os.chmod(name, 0o600)


class Database:
    def __init__(self, path: Path):
        self.path = path
        _root_only(path)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        _root_only(
            path
        )  # sqlite makes -wal and -shm with the database's mode, but an older file may be 0644
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        create_or_migrate(self._conn)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- results ----------------------------------------------------------

    def get_result(self, key: str) -> Result | None:
        row = self._conn.execute("SELECT * FROM results WHERE key = ?", (key,)).fetchone()
        return Result(**dict(row)) if row else None

    def put_result(self, result: Result, remote: RemoteRecord | None = None) -> None:
        """Record a result made here (any remote record of its key goes), or one
        found in a remote, with ``remote`` saying where its closure is."""
        # Everything a local result names was made durable by the store before
        # we get here, so a result that survives a crash never dangles.
        values = asdict(result)
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})", list(values.values())
            )
            conn.execute("DELETE FROM remote_results WHERE key = ?", (result.key,))
            if remote is not None:
                conn.execute(
                    "INSERT INTO remote_results (key, url, manifest_digest, manifest, found)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (result.key, remote.url, remote.manifest_digest, remote.manifest, time.time()),
                )

    # -- where remote results' closures are (daemon/remote/lazy.py) -------

    def get_remote(self, key: str) -> RemoteRecord | None:
        row = self._conn.execute(
            "SELECT url, manifest_digest, manifest FROM remote_results WHERE key = ?", (key,)
        ).fetchone()
        return RemoteRecord(row[0], row[1], bytes(row[2])) if row else None

    def remote_sources(self, *, tree: str | None = None, log: str | None = None
                       ) -> list[tuple[Result, RemoteRecord]]:  # fmt: skip
        """Remote results whose closure holds ``tree`` (after-tree first), or whose log is ``log``."""
        where = "r.log = ?1" if log is not None else "r.after_tree = ?1 OR r.before_tree = ?1"
        rows = self._conn.execute(
            "SELECT r.*, m.url AS m_url, m.manifest_digest AS m_digest, m.manifest AS m_bytes"
            f" FROM remote_results m JOIN results r ON r.key = m.key WHERE {where}"
            " ORDER BY r.after_tree = ?1 DESC, m.found DESC LIMIT 8",
            (log if log is not None else tree,),
        ).fetchall()
        out = []
        for row in rows:
            d = dict(row)
            record = RemoteRecord(d.pop("m_url"), d.pop("m_digest"), bytes(d.pop("m_bytes")))
            out.append((Result(**d), record))
        return out

    def remote_keys(self, *, found_since: float = 0.0) -> set[str]:
        rows = self._conn.execute("SELECT key FROM remote_results WHERE found >= ?", (found_since,))
        return {row[0] for row in rows}

    def applied_packs(self) -> set[str]:
        return {row[0] for row in self._conn.execute("SELECT digest FROM remote_packs")}

    def pack_applied(self, digest: str) -> None:
        self._conn.execute("INSERT OR IGNORE INTO remote_packs (digest) VALUES (?)", (digest,))

    def forget_applied_packs(self) -> None:
        self._conn.execute("DELETE FROM remote_packs")

    # -- builds -----------------------------------------------------------

    def next_seq(self) -> int:
        row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM builds").fetchone()
        return int(row[0])

    def insert_build(self, build: BuildRecord, steps: list[StepRecord]) -> None:
        with self.transaction() as conn:
            values = asdict(build)
            conn.execute(
                f"INSERT INTO builds ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
                list(values.values()),
            )
            for step in steps:
                sv = asdict(step)
                conn.execute(
                    f"INSERT INTO build_steps ({', '.join(sv)}) VALUES ({', '.join('?' for _ in sv)})",
                    list(sv.values()),
                )

    def update_build(self, build_id: str, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._conn.execute(f"UPDATE builds SET {sets} WHERE id = ?", [*fields.values(), build_id])

    def update_step(self, build_id: str, idx: int, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._conn.execute(
            f"UPDATE build_steps SET {sets} WHERE build_id = ? AND idx = ?",
            [*fields.values(), build_id, idx],
        )

    def get_build(self, build_id: str) -> BuildRecord | None:
        row = self._conn.execute("SELECT * FROM builds WHERE id = ?", (build_id,)).fetchone()
        return BuildRecord(**dict(row)) if row else None

    def get_steps(self, build_id: str) -> list[StepRecord]:
        rows = self._conn.execute(
            "SELECT * FROM build_steps WHERE build_id = ? ORDER BY idx", (build_id,)
        ).fetchall()
        return [StepRecord(**dict(r)) for r in rows]

    def list_builds(self, limit: int = 50, uid: int | None = None) -> list[BuildRecord]:
        if uid is None:
            rows = self._conn.execute("SELECT * FROM builds ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._conn.execute(
                "SELECT * FROM builds WHERE uid = ? ORDER BY seq DESC LIMIT ?", (uid, limit)
            )
        return [BuildRecord(**dict(r)) for r in rows.fetchall()]

    def builds_with_status(self, *statuses: str) -> list[BuildRecord]:
        marks = ", ".join("?" for _ in statuses)
        rows = self._conn.execute(f"SELECT * FROM builds WHERE status IN ({marks})", statuses)
        return [BuildRecord(**dict(r)) for r in rows.fetchall()]

    def delete_build(self, build_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM build_steps WHERE build_id = ?", (build_id,))
            conn.execute("DELETE FROM build_notes WHERE build_id = ?", (build_id,))
            conn.execute("DELETE FROM builds WHERE id = ?", (build_id,))

    # -- images -----------------------------------------------------------

    def put_image(self, name: str, tree: str, source: str, uid: int) -> None:
        """Name ``tree`` as ``name`` in ``uid``'s namespace (0: the shared one), replacing it."""
        self._conn.execute(
            "INSERT OR REPLACE INTO images (uid, name, tree, source, created) VALUES (?, ?, ?, ?, ?)",
            (uid, name, tree, source, time.time()),
        )

    def delete_image(self, name: str, uid: int) -> None:
        self._conn.execute("DELETE FROM images WHERE uid = ? AND name = ?", (uid, name))

    def get_image(self, name: str, uid: int) -> dict | None:
        """Image ``name`` of ``uid``'s own namespace only."""
        row = self._conn.execute(
            "SELECT * FROM images WHERE uid = ? AND name = ?", (uid, name)
        ).fetchone()
        return dict(row) if row else None

    def find_image(self, name: str, uid: int) -> dict | None:
        """What ``name`` means to ``uid``: their own image, else root's (shared), never another's."""
        return self.get_image(name, uid) or (self.get_image(name, 0) if uid != 0 else None)

    def tree_visible_to(self, tree: str, uid: int) -> bool:
        """Whether ``uid`` may name tree ``tree`` (hex): root, or it is a state of
        one of their builds, their out-link, an image of theirs or root's (shared), or
        a base they pulled from a registry themselves."""
        if uid == 0:
            return True
        row = self._conn.execute(
            "SELECT 1 FROM builds WHERE uid = ?1 AND (base_tree = ?2 OR final_tree = ?2) "
            "UNION ALL SELECT 1 FROM build_steps s JOIN builds b ON b.id = s.build_id "
            "WHERE b.uid = ?1 AND (s.before_tree = ?2 OR s.after_tree = ?2) "
            "UNION ALL SELECT 1 FROM images WHERE tree = ?2 AND uid IN (0, ?1) "
            "UNION ALL SELECT 1 FROM pulled_bases WHERE tree = ?2 AND uid = ?1 "
            "UNION ALL SELECT 1 FROM out_links WHERE uid = ?1 AND tree = ?2 LIMIT 1",
            (uid, tree),
        ).fetchone()
        return row is not None

    def list_images(self) -> list[dict]:
        return [
            dict(r)
            for r in self._conn.execute("SELECT * FROM images ORDER BY name, uid").fetchall()
        ]

    # -- downloads and build notes ------------------------------------------

    def put_download(self, blob: str, sha256: str, size: int, url: str) -> None:
        """Remember fetched content (the first URL it came from is kept)."""
        self._conn.execute(
            "INSERT OR IGNORE INTO downloads (blob, sha256, size, url, fetched) VALUES (?, ?, ?, ?, ?)",
            (blob, sha256, size, url, time.time()),
        )

    def find_download(self, *, sha256: str | None = None, blob: str | None = None) -> dict | None:
        """The download row with that sha256 (or blob digest), if any."""
        if sha256 is not None:
            row = self._conn.execute(
                "SELECT * FROM downloads WHERE sha256 = ? ORDER BY fetched LIMIT 1", (sha256,)
            ).fetchone()
        else:
            row = self._conn.execute("SELECT * FROM downloads WHERE blob = ?", (blob,)).fetchone()
        return dict(row) if row else None

    def download_blobs(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT blob FROM downloads")]

    def delete_downloads(self, blobs: list[str]) -> None:
        """Forget downloads whose content GC collected (a later build fetches again)."""
        with self.transaction() as conn:
            conn.executemany("DELETE FROM downloads WHERE blob = ?", [(b,) for b in blobs])

    def add_build_note(self, build_id: str, message: str) -> None:
        self._conn.execute(
            "INSERT INTO build_notes (build_id, created, message) VALUES (?, ?, ?)",
            (build_id, time.time(), message),
        )

    def get_build_notes(self, build_id: str) -> list[str]:
        rows = self._conn.execute(
            "SELECT message FROM build_notes WHERE build_id = ? ORDER BY rowid", (build_id,)
        )
        return [r[0] for r in rows.fetchall()]

    # -- meta -------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- pins and out-links (see pins.py) ---------------------------------

    def put_pin(self, pin: Pin) -> None:
        values = asdict(pin)
        self._conn.execute(
            f"INSERT OR REPLACE INTO pins ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
            list(values.values()),
        )

    def get_pin(self, name: str) -> Pin | None:
        row = self._conn.execute("SELECT * FROM pins WHERE name = ?", (name,)).fetchone()
        return Pin(**dict(row)) if row else None

    def delete_pin(self, name: str) -> None:
        self._conn.execute("DELETE FROM pins WHERE name = ?", (name,))

    def list_pins(self) -> list[Pin]:
        rows = self._conn.execute("SELECT * FROM pins ORDER BY name").fetchall()
        return [Pin(**dict(r)) for r in rows]

    def put_out_link(self, link: OutLink) -> None:
        values = asdict(link)
        self._conn.execute(
            f"INSERT OR REPLACE INTO out_links ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
            list(values.values()),
        )

    def get_out_link(self, path: str) -> OutLink | None:
        row = self._conn.execute("SELECT * FROM out_links WHERE path = ?", (path,)).fetchone()
        return OutLink(**dict(row)) if row else None

    def list_out_links(self) -> list[OutLink]:
        rows = self._conn.execute("SELECT * FROM out_links ORDER BY path").fetchall()
        return [OutLink(**dict(r)) for r in rows]

    def delete_out_link(self, path: str) -> None:
        self._conn.execute("DELETE FROM out_links WHERE path = ?", (path,))

    # -- the remote push queue (daemon/remote/queue.py) ------------------------

    def queue_push(self, key: str, url: str) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO remote_pushes (key, url, queued) VALUES (?, ?, ?)",
            (key, url, time.time()),
        )

    def pending_pushes(self, limit: int = 100) -> list[tuple[str, str, int]]:
        """``(key, url, attempts)``, oldest first."""
        rows = self._conn.execute(
            "SELECT key, url, attempts FROM remote_pushes ORDER BY queued LIMIT ?", (limit,)
        )
        return [tuple(r) for r in rows.fetchall()]

    def push_done(self, key: str, url: str) -> None:
        self._conn.execute("DELETE FROM remote_pushes WHERE key = ? AND url = ?", (key, url))

    def push_failed(self, key: str, url: str) -> None:
        self._conn.execute(
            "UPDATE remote_pushes SET attempts = attempts + 1, queued = ? WHERE key = ? AND url = ?",
            (time.time(), key, url),
        )

    def push_pending(self, key: str, url: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM remote_pushes WHERE key = ? AND url = ?", (key, url)
        )
        return row.fetchone() is not None

    # -- pin tags in remotes (daemon/remote/pins.py) ---------------------------

    def remote_pins(self, name: str | None) -> list[dict]:
        """The rows of pin ``name`` (every pin's for None), by remote and tag."""
        where, args = ("WHERE name = ?", (name,)) if name is not None else ("", ())
        rows = self._conn.execute(f"SELECT * FROM remote_pins {where} ORDER BY url, tag", args)
        return [dict(r) for r in rows.fetchall()]

    def put_remote_pin(self, name: str, url: str, tag: str, key: str) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO remote_pins (name, url, tag, key, state) VALUES (?, ?, ?, ?, 'tag')",
            (name, url, tag, key),
        )

    def set_remote_pin_state(
        self, url: str, tag: str, state: str, *, digest: str | None = None, note: str | None = None
    ) -> None:
        self._conn.execute(
            "UPDATE remote_pins SET state = ?, digest = COALESCE(?, digest), note = ?, attempts = 0"
            " WHERE url = ? AND tag = ?",
            (state, digest, note, url, tag),
        )

    def remote_pin_failed(self, url: str, tag: str, note: str) -> None:
        self._conn.execute(
            "UPDATE remote_pins SET attempts = attempts + 1, note = ? WHERE url = ? AND tag = ?",
            (note, url, tag),
        )

    def delete_remote_pin(self, url: str, tag: str) -> None:
        self._conn.execute("DELETE FROM remote_pins WHERE url = ? AND tag = ?", (url, tag))

    # -- the completeness record (see complete.py) ----------------------------

    def tree_complete(self, tree: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM complete_trees WHERE tree = ?", (tree,))
        return row.fetchone() is not None

    def complete_epoch(self) -> int:
        return int(self.get_meta("complete_epoch") or 0)

    def add_complete_tree(self, tree: str, epoch: int) -> None:
        """Record ``tree`` complete, unless fsck removed objects since ``epoch`` was read."""
        self._conn.execute(
            "INSERT OR IGNORE INTO complete_trees (tree) SELECT ?1 WHERE"
            " COALESCE((SELECT value FROM meta WHERE key = 'complete_epoch'), '0') = ?2",
            (tree, str(epoch)),
        )

    def complete_trees(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT tree FROM complete_trees")]

    def forget_complete_trees(self, trees: list[str], *, new_epoch: bool = False) -> None:
        """Delete these rows; with ``new_epoch``, also refuse inserts of walks begun before."""
        with self.transaction() as conn:
            conn.executemany("DELETE FROM complete_trees WHERE tree = ?", [(t,) for t in trees])
            if new_epoch:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('complete_epoch', ?)",
                    (str(self.complete_epoch() + 1),),
                )

    # -- what garbage collection reads and trims (see gc.py) ----------------

    def results_rowid_max(self) -> int:
        return int(self._conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM results").fetchone()[0])

    def result_refs(self) -> Iterator[tuple[int, str, str, str, str]]:
        """``(rowid, key, before_tree, after_tree, log)`` of every result."""
        yield from self._conn.execute(
            "SELECT rowid, key, before_tree, after_tree, log FROM results"
        )

    def results_by_keys(self, keys: list[str]) -> list[Result]:
        found: list[Result] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = self._conn.execute(
                f"SELECT * FROM results WHERE key IN ({', '.join('?' for _ in chunk)})", chunk
            ).fetchall()
            found += [Result(**dict(r)) for r in rows]
        return found

    def delete_results(self, keys: list[str], *, max_rowid: int) -> int:
        """Delete results by key, only rows that existed when GC looked (rowid <= max_rowid)."""
        deleted = 0
        with self.transaction() as conn:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                cur = conn.execute(
                    f"DELETE FROM results WHERE rowid <= ? AND key IN ({', '.join('?' for _ in chunk)})",
                    [max_rowid, *chunk],
                )
                deleted += cur.rowcount
                conn.execute(  # where a remote holds them: said only of results that are
                    f"DELETE FROM remote_results WHERE key IN ({', '.join('?' for _ in chunk)})"
                    " AND key NOT IN (SELECT key FROM results)",
                    chunk,
                )
        return deleted

    def all_builds(self) -> list[BuildRecord]:
        rows = self._conn.execute("SELECT * FROM builds ORDER BY seq DESC").fetchall()
        return [BuildRecord(**dict(r)) for r in rows]

    def step_refs(
        self, build_ids: list[str]
    ) -> list[tuple[str, str | None, str | None, str | None, str | None]]:
        """``(build_id, key, before_tree, after_tree, log)`` of these builds' steps."""
        out: list = []
        for i in range(0, len(build_ids), 500):
            chunk = build_ids[i : i + 500]
            out += self._conn.execute(
                "SELECT build_id, key, before_tree, after_tree, log FROM build_steps"
                f" WHERE build_id IN ({', '.join('?' for _ in chunk)})",
                chunk,
            ).fetchall()
        return [tuple(r) for r in out]

    def delete_builds(self, build_ids: list[str]) -> None:
        with self.transaction() as conn:
            for i in range(0, len(build_ids), 500):
                chunk = build_ids[i : i + 500]
                marks = ", ".join("?" for _ in chunk)
                conn.execute(f"DELETE FROM build_steps WHERE build_id IN ({marks})", chunk)
                conn.execute(f"DELETE FROM build_notes WHERE build_id IN ({marks})", chunk)
                conn.execute(f"DELETE FROM builds WHERE id IN ({marks})", chunk)
