"""``amber store fsck``: rehash the store, and say what its damage breaks.

Runs under ``Collector.lock`` (gc.py), so no GC cycle runs meanwhile and
nothing is in quarantine. A result a remote cache holds (a lazy hit,
``remote/lazy.py``) may lack its closure here: that is not damage. Every completeness row (complete.py) is proved
again afterwards: a row that named a missing or corrupt object is deleted,
so a cache hit on that tree walks it, finds the damage and reruns its step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amber.daemon.storage.db import Database
from amber.daemon.storage.pins import out_link_alive
from amber.sandbox.closure import ClosureCheck
from amber.sandbox.store import Store


def check_store(store: Store, db_path: Path, repair: bool) -> dict[str, Any]:
    """Rehash every object; find results, pins and out-links that need what is broken.

    With ``repair``: corrupt objects are removed and the results that need a
    missing or corrupt object are dropped, so those steps rerun; pins are
    kept (and reported) since a rebuild can make them whole again.
    """
    scan = store.fsck(remove_corrupt=repair)
    presence = _Problems(store.closure_check(bad=set() if repair else scan.bad, settled=True))
    db = Database(db_path)
    try:
        # A repair removed objects: walks begun before cannot record (complete.py).
        presence.forget_complete(db, new_epoch=repair and bool(scan.bad))
        max_rowid = db.results_rowid_max()
        # A remote cache holds these: what the store lacks of them is pulled when
        # needed (remote/lazy.py), not damage.
        remote = db.remote_keys()
        if repair and scan.bad:
            db.forget_applied_packs()  # their objects may be among those removed
        missing: list[dict[str, str]] = []
        for rowid, key, before, after, log_digest in db.result_refs():
            if rowid > max_rowid or key in remote:
                continue
            why = presence.problem([before, after], [log_digest])
            if why:
                missing.append({"message": f"cached result {key[:12]}: {why}", "key": key})
        dropped = 0
        if repair and missing:
            dropped = db.delete_results([m["key"] for m in missing], max_rowid=max_rowid)
        problems = _record_problems(db, presence)
    finally:
        db.close()
    return {
        "blobs_checked": scan.blobs_checked,
        "trees_checked": scan.trees_checked,
        "corrupt": scan.corrupt,
        "missing": missing,
        "problems": problems,
        "repaired": repair,
        "results_dropped": dropped,
        "temp_files": scan.temp_files,
    }


def _record_problems(db: Database, presence: _Problems) -> list[dict[str, str]]:
    """Pins, images and live out-links that name something incomplete."""
    problems: list[dict[str, str]] = []
    for pin in db.list_pins():
        held = pin.roots_dict()
        why = presence.problem(held.get("trees", []), held.get("blobs", []))
        if why:
            problems.append({"message": f"pin {pin.name} ({pin.target}) is incomplete: {why}",
                             "pin": pin.name})  # fmt: skip
    for image in db.list_images():
        why = presence.problem([image["tree"]], [])
        if why:
            problems.append(
                {"message": f"image {image['name']} is incomplete: {why}", "image": image["name"]}
            )
    for link in db.list_out_links():
        why = presence.problem([link.tree], [])
        if why and out_link_alive(link):
            problems.append(
                {"message": f"out-link {link.path} is incomplete: {why}", "path": link.path}
            )
    return problems


class _Problems:
    """Why a record's trees and blobs (hex, some empty) are not whole."""

    def __init__(self, check: ClosureCheck):
        self.check = check

    def problem(self, trees: list[str], blobs: list[str]) -> str | None:
        return self.check.missing(
            [bytes.fromhex(t) for t in trees if t], [bytes.fromhex(b) for b in blobs if b]
        )

    def forget_complete(self, db: Database, *, new_epoch: bool) -> None:
        """Delete the completeness rows this check cannot prove."""
        if new_epoch:
            db.forget_complete_trees([], new_epoch=True)
        doomed = [tree for tree in db.complete_trees() if self.problem([tree], [])]
        if doomed:
            db.forget_complete_trees(doomed)
