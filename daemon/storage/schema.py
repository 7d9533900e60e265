"""The database's tables, and bringing a database made by an older amberd up to them.

``CREATE TABLE IF NOT EXISTS`` makes a new database whole but leaves an old
one's tables as they were: newer columns are added, and a table whose key
changed is rebuilt, keeping its rows.
"""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,          -- step key (hex)
    status TEXT NOT NULL,          -- success | failed
    exit_code INTEGER,
    signal INTEGER,
    before_tree TEXT NOT NULL,
    after_tree TEXT NOT NULL,
    log TEXT NOT NULL,             -- blob digest of the step's output
    started REAL NOT NULL,
    seconds REAL NOT NULL,
    host TEXT NOT NULL,
    build_id TEXT NOT NULL,
    step TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,            -- JSON of the parsed spec
    spec_path TEXT NOT NULL,
    status TEXT NOT NULL,          -- queued | running | success | failed | errored
    frozen INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    finished REAL,
    failed_step TEXT,
    base_tree TEXT,
    final_tree TEXT,
    error TEXT,
    base_owner INTEGER,            -- the namespace (uid) of the named image it built on
    base_digest TEXT,              -- a docker:// base: the digest its reference resolved to
    phases TEXT                    -- JSON: seconds per phase outside the steps (build/phases.py)
);
CREATE INDEX IF NOT EXISTS builds_seq ON builds(seq);
CREATE TABLE IF NOT EXISTS build_steps (
    build_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    key TEXT,
    status TEXT NOT NULL,          -- pending | running | ran | cached | cached-failure | failed | errored | skipped
    exit_code INTEGER,
    signal INTEGER,
    seconds REAL,
    before_tree TEXT,
    after_tree TEXT,
    log TEXT,
    definition TEXT NOT NULL,      -- JSON: run, cwd, env, ... as the step ran
    note TEXT,
    started REAL,                  -- epoch: when the step ran, or was found cached, in this build
    phases TEXT,                   -- JSON: seconds per phase of running it (build/phases.py)
    PRIMARY KEY (build_id, idx)
);
-- Named images, one namespace per user: uid 0's are the shared ones, which
-- every user's names fall back to (daemon/api/images.py).
CREATE TABLE IF NOT EXISTS images (
    uid INTEGER NOT NULL,          -- whose namespace (0: root's, the shared one)
    name TEXT NOT NULL,
    tree TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (uid, name)
);
-- Bases pulled from registries (``docker://`` in a spec, ``amber image import
-- NAME docker://...``), per user like images: a user's record says which tree
-- the image DIGEST (what a tag resolved to: a manifest or an index) of
-- REGISTRY/REPOSITORY became, so that it is not pulled again. Nobody reads
-- another user's rows (daemon/storage/pulled.py). The tree may have been
-- collected since: check the store before trusting a row.
CREATE TABLE IF NOT EXISTS pulled_bases (
    uid INTEGER NOT NULL,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,          -- sha256:... of the document the reference named
    manifest TEXT NOT NULL,        -- sha256:... of the image manifest used (this platform's)
    tree TEXT NOT NULL,            -- BLAKE3 hex: the image's root tree
    tag TEXT,                      -- the tag it was last pulled by (NULL: by digest)
    pulled REAL NOT NULL,
    PRIMARY KEY (uid, registry, repository, digest)
);
-- Content fetched for url sources, so that a later build names it by digest
-- and never downloads it again (daemon/build/fetch.py). The blob may have been
-- collected since (GC then drops the row): check the store before trusting a row.
CREATE TABLE IF NOT EXISTS downloads (
    blob TEXT PRIMARY KEY,         -- BLAKE3 hex: the blob in the store
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    url TEXT NOT NULL,             -- where it was fetched from (first time)
    fetched REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS downloads_sha256 ON downloads(sha256);
-- Notes a build made outside its steps' output (e.g. what the stamp rules
-- removed from its initial tree), replayed by `amber log`.
CREATE TABLE IF NOT EXISTS build_notes (
    build_id TEXT NOT NULL,
    created REAL NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS build_notes_build ON build_notes(build_id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- build | step | result | tree
    target TEXT NOT NULL,          -- as the user named it, normalised
    uid INTEGER NOT NULL,
    created REAL NOT NULL,
    roots TEXT NOT NULL            -- JSON: {"trees": [...], "blobs": [...], "results": [...], "builds": [...]}
);
-- Results waiting to be pushed to a remote cache (daemon/remote/queue.py):
-- kept here so that a restart finishes what a stop interrupted.
CREATE TABLE IF NOT EXISTS remote_pushes (
    key TEXT NOT NULL,
    url TEXT NOT NULL,
    queued REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, url)
);
-- Pin tags in remote caches (daemon/remote/pins.py): what this host tagged, or
-- is to tag (state tag) or re-point to the tombstone (state untag).
CREATE TABLE IF NOT EXISTS remote_pins (
    name TEXT NOT NULL,            -- the local pin
    url TEXT NOT NULL,             -- the remote (registry + repository)
    tag TEXT NOT NULL,             -- pin-USER.NAME.N
    key TEXT NOT NULL,             -- the step key whose result it tags
    state TEXT NOT NULL,           -- tag | tagged | failed | untag
    digest TEXT,                   -- the manifest tagged, once tagged
    attempts INTEGER NOT NULL DEFAULT 0,
    note TEXT,                     -- why it failed, for `amber pin ls`
    PRIMARY KEY (url, tag)
);
-- Results found in a remote cache (daemon/remote/lazy.py): their closure is
-- there, and comes here only when something needs it (a lazy hit). The result
-- itself is a row of results; this says where to fetch what it names.
CREATE TABLE IF NOT EXISTS remote_results (
    key TEXT PRIMARY KEY,
    url TEXT NOT NULL,             -- the remote: registry and repository
    manifest_digest TEXT NOT NULL, -- sha256, as the registry names the manifest
    manifest BLOB NOT NULL,        -- its bytes, checked (shape, signature) when it was found
    found REAL NOT NULL
);
-- Packs of a remote whose objects a pull put in the store (a resumed pull
-- skips them); GC and fsck --repair empty it, as they may take those objects.
CREATE TABLE IF NOT EXISTS remote_packs (
    digest TEXT PRIMARY KEY
) WITHOUT ROWID;
-- Trees whose whole closure is in the store (daemon/storage/complete.py): a
-- cache hit on them checks a row, not the closure. GC and fsck delete a row
-- before anything of its closure leaves the store.
CREATE TABLE IF NOT EXISTS complete_trees (
    tree TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS out_links (
    path TEXT PRIMARY KEY,         -- absolute; a root while it is still the checkout we made
    build_id TEXT NOT NULL,
    tree TEXT NOT NULL,
    uid INTEGER NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    created REAL NOT NULL
);
"""

#: (table, column, type) added after the first release, in order.
_ADDED_COLUMNS = (
    ("build_steps", "started", "REAL"),
    ("images", "uid", "INTEGER"),
    ("builds", "base_owner", "INTEGER"),
    ("builds", "base_digest", "TEXT"),
    ("builds", "phases", "TEXT"),
    ("build_steps", "phases", "TEXT"),
)

#: Images keyed by (uid, name); rows from before keep their owner (NULL: root's).
_IMAGES_PER_USER = """
CREATE TABLE images_per_user (
    uid INTEGER NOT NULL, name TEXT NOT NULL, tree TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (uid, name)
);
INSERT INTO images_per_user (uid, name, tree, source, created)
    SELECT COALESCE(uid, 0), name, tree, source, created FROM images;
DROP TABLE images;
ALTER TABLE images_per_user RENAME TO images;
"""


def create_or_migrate(conn: sqlite3.Connection) -> None:
    """Make the tables, or bring an older database's up to them (autocommit ``conn``)."""
    conn.executescript(SCHEMA)
    for table, column, kind in _ADDED_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    keys = [row[1] for row in conn.execute("PRAGMA table_info(images)") if row[5]]
    if keys == ["name"]:  # one global namespace: rebuilt as (uid, name)
        try:
            conn.executescript(f"BEGIN IMMEDIATE; {_IMAGES_PER_USER} COMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
