"""``verify``: which stamps and products of a state the stamp rules find inconsistent.

- ``{spec_text, spec_path}``: the initial tree the spec would build from
  (base, sources and their stamps), before amber puts it right: each
  problem is something a build would remove. Nothing is downloaded: a url
  source not in the store yet is checked as if it were (an empty stand-in
  at its dest, with its stamp), and ``notes`` says so.
- ``{build}``: the build's state (its final tree, or the state at failure),
  under the rules of the spec it ran.

Nothing changes: no build is made, no tree is rewritten in place (laying
out a spec may store the trees of its local sources, as a build would).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from amber.daemon.api.builds import base_credentials, parse_spec_request
from amber.daemon.api.operation import operation
from amber.daemon.build.bases import resolve_base
from amber.daemon.build.fetch import DigestMismatch, Fetched, known_source, source_label
from amber.daemon.build.frozen import make_local, resolve_state
from amber.daemon.build.registry_base import RegistryAccess
from amber.daemon.build.sources import lay_out
from amber.daemon.build.spec import Spec, SpecError, spec_from_dict
from amber.daemon.build.stamps import check_tree
from amber.daemon.errors import BadArgs, Internal, NotFound
from amber.daemon.storage.db import BuildRecord
from amber.daemon.userthreads import run_as_user
from amber.sandbox.asuser import User
from amber.sandbox.digest import from_hex

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.oci.auth import Credentials
    from amber.daemon.server import Connection
    from amber.daemon.storage.roots import Hold


@operation(
    spec_text=(str | None, None),
    spec_path=(str | None, None),
    build=(str | None, None),
    auth=(dict[str, dict[str, str]] | None, None),
)
async def verify(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    spec_text, spec_path, build = args["spec_text"], args["spec_path"], args["build"]
    if build is not None:
        if spec_text is not None or spec_path is not None:
            raise BadArgs("verify takes a build or a spec, not both")
        return await _verify_build(api, api.record(conn, build))
    if spec_text is None or spec_path is None:
        raise BadArgs("verify needs build, or spec_text and spec_path")
    peer = conn.peer
    spec = await parse_spec_request(spec_text, spec_path, User(peer.uid, peer.gid, peer.groups))
    result = await _verify_spec(api, conn, spec, spec_path, base_credentials(args["auth"], spec))
    for message in result["notes"]:
        await api.send_event(conn, "note", {"message": message})
    return result


async def _verify_spec(
    api: Api, conn: Connection, spec: Spec, spec_path: str, credentials: Credentials | None
) -> dict[str, Any]:
    store, db = api.ctx.store, api.ctx.db
    uid, gid = conn.peer.uid, conn.peer.gid

    known: dict[int, Fetched] = {}
    try:
        for index, source in enumerate(spec.sources):
            if source.url is not None:
                found = known_source(store, db, source, source_label(index, source))
                if found is not None:
                    known[index] = found
    except DigestMismatch as exc:
        return {"target": spec_path, "problems": [_mismatch(exc)], "notes": []}

    def work(writer: Hold) -> dict[str, Any]:
        store, groups = writer.store, conn.peer.groups
        access = RegistryAccess(credentials, complete=writer.complete_one)
        base = resolve_base(store, db, str(spec.base), uid=uid, gid=gid, groups=groups,
                            registry=access)  # fmt: skip
        try:
            layout = lay_out(store, base.tree, spec, known, uid=uid, gid=gid, groups=groups,
                             missing_ok=True)  # fmt: skip
        except DigestMismatch as exc:
            return {"target": spec_path, "problems": [_mismatch(exc)], "notes": []}
        problems = [finding.to_dict() for finding in layout.findings]
        notes = [
            f"{source_label(i, spec.sources[i])} is not in the store yet: checked as a build "
            "would have it, content aside"
            for i in layout.skipped
        ]
        result = {"target": spec_path, "problems": problems, "notes": notes}
        if not layout.skipped:  # else the tree holds stand-ins for what was not fetched
            result["tree"] = layout.tree.hex()
        return result

    # Laying out writes the trees of local sources (and reuses what is there).
    with api.ctx.roots.writer(f"verify of {spec_path}") as writer:
        return await run_as_user(uid, work, writer)  # the user's helper reads local sources


def _mismatch(exc: DigestMismatch) -> dict[str, Any]:
    return {"message": exc.message, "kind": "digest-mismatch"}


async def _verify_build(api: Api, record: BuildRecord) -> dict[str, Any]:
    tree, label = _state_of(api, record)
    document = json.loads(record.spec)
    if "imported_from" in document:
        raise NotFound(
            f"build {record.id} was imported from an image: its spec (sources and stamp "
            "rules) did not come with it, so there is nothing to verify it against",
        )
    try:
        # Only what the rules need: the sources' host paths may be gone by now.
        spec = spec_from_dict(
            {k: document[k] for k in ("build", "step", "stamp") if k in document},
            f"build {record.id}",
            Path(record.spec_path).parent,
        )
    except SpecError as exc:
        raise Internal(f"the spec of build {record.id} no longer reads: {exc}") from None
    keep = [s.get("dest") for s in document.get("source", [])]
    keep += [s["stamp"] for s in document.get("source", []) if s.get("stamp")]
    store = api.ctx.store

    def work() -> list[dict[str, Any]]:
        if not store.has_tree(tree):
            raise NotFound(f"the {label} of build {record.id} is no longer in the store")
        findings = check_tree(store, tree, spec.workdir, spec.stamps, keep=[k for k in keep if k])
        return [finding.to_dict() for finding in findings]

    with api.ctx.roots.hold(f"verify of {record.id}") as hold:
        await make_local(api.ctx, hold, [tree], f"{label} of build {record.id}")
        problems = await trio.to_thread.run_sync(work)
    return {
        "target": record.id,
        "state": label,
        "tree": tree.hex(),
        "problems": problems,
        "notes": [],
    }


def _state_of(api: Api, record: BuildRecord) -> tuple[bytes, str]:
    """The tree ``amber verify BUILD`` looks at, and what to call it."""
    if record.final_tree:
        return from_hex(record.final_tree), "final state"
    try:
        state = resolve_state(api.ctx.db, record, step=None, before=False)
    except NotFound:  # no step finished: the state it started from
        if record.base_tree:
            return from_hex(record.base_tree), "initial state"
        raise
    return state.tree, f"state after step {state.step.name}"
