"""``amber push`` and ``amber pull``: moving results to and from remote caches by hand.

The background queue (remote/service.py) pushes every result after its
step; these are for a result the queue gave up on, a remote added since, or
a store to fill before going offline. Both name a build of the caller's own
(``Api.record``: another user's build is refused), or, for ``pull``, a step
key: what a key names is only ever used by a build whose inputs give that
key, so fetching it shows its caller nothing.

Each result is one step of the answer: a ``progress`` event as it is done,
then a summary. What goes wrong with one result (a registry that refuses
or cannot be reached, a blob that does not verify) is that result's
outcome, not an error of the request: the client exits 1 when any failed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from amber.client import __version__
from amber.client.units import human_bytes
from amber.daemon.api.operation import operation
from amber.daemon.build.state import StepStatus
from amber.daemon.errors import BadArgs, ExportFailed, NotFound
from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OciError
from amber.daemon.remote import pull as remote_pull
from amber.daemon.remote import push as remote_push
from amber.daemon.remote import trust
from amber.daemon.remote.config import CacheConfigError, Remote, parse_remote_url
from amber.daemon.storage.db import RemoteRecord, Result
from amber.sandbox.digest import HEX_SIZE, from_hex
from amber.sandbox.store import StoreError

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.server import Connection
    from amber.daemon.storage.db import BuildRecord
    from amber.daemon.storage.roots import Hold

log = logging.getLogger("amber.remote")

#: Step statuses whose key names a result (a failure included; errored never).
_WITH_RESULT = (StepStatus.RAN, StepStatus.CACHED, StepStatus.FAILED, StepStatus.CACHED_FAILURE)


@dataclass
class Outcome:
    """What became of one result at one remote."""

    step: str
    key: str
    url: str
    outcome: str  # pushed | present | failed | not-tried | pulled | missing
    bytes: int = 0
    error: str | None = None
    host: str | None = None


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)
    stats: remote_push.PushStats = field(default_factory=remote_push.PushStats)

    def count(self, what: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == what)

    def to_wire(self, **extra: Any) -> dict[str, Any]:
        counts = {w: self.count(w) for w in ("pushed", "present", "failed", "not-tried", "pulled",
                                             "missing")}  # fmt: skip
        return {**extra, **counts, "bytes": sum(o.bytes for o in self.outcomes),
                "blobs": asdict(self.stats), "results": [asdict(o) for o in self.outcomes]}  # fmt: skip


def _checked_url(url: str, flag: str) -> str:
    try:
        return parse_remote_url(url)
    except CacheConfigError as exc:
        raise BadArgs(f"{flag}: {exc}") from None


def _cache(api: Api) -> Any:
    if api.ctx.remote is None:
        raise BadArgs("this amberd has no remote cache service")
    return api.ctx.remote


def _step_results(api: Api, record: BuildRecord) -> list[tuple[str, Result]]:
    """The build's steps that produced or found a result, with it (in step order)."""
    found = []
    for step in api.ctx.db.get_steps(record.id):
        if step.key and step.status in _WITH_RESULT:
            result = api.ctx.db.get_result(step.key)
            if result is not None:
                found.append((step.name, result))
    return found


def _roots_of(results: list[Result]) -> tuple[list[bytes], list[bytes]]:
    trees = [from_hex(t) for r in results for t in (r.before_tree, r.after_tree)]
    return trees, [from_hex(r.log) for r in results]


# -- push ----------------------------------------------------------------------------


@operation(build=str, to=(str | None, None))
async def push(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    """Push a build's results (successes and failures) now, to its push remotes or ``to``."""
    record = api.record(conn, args["build"])
    cache = _cache(api)
    key = cache.signing_key
    if key is None:
        raise ExportFailed(
            "this amberd has no signing key, so it pushes nothing: set [cache] signing-key in "
            "amberd.toml to a key from `amber key generate NAME` (README: Sharing a cache)"
        )
    if args["to"] is not None:
        urls = [_checked_url(args["to"], "--to")]
    else:
        urls = [r.url for r in cache.config.remotes if r.push]
    if not urls:
        raise BadArgs(
            "nowhere to push: no [[cache.remote]] of amberd.toml has push = true; give --to URL"
        )
    steps = _step_results(api, record)
    summary = Summary()
    with api.ctx.roots.hold(f"push of {record.id}") as hold:
        await trio.to_thread.run_sync(hold.add, *_roots_of([r for _, r in steps]))
        for url in urls:
            await _push_to(api, conn, hold, url, steps, key, summary)
    return summary.to_wire(build=record.id, urls=urls)


async def _push_to(
    api: Api,
    conn: Connection,
    hold: Hold,
    url: str,
    steps: list[tuple[str, Result]],
    key: trust.SigningKey,
    summary: Summary,
) -> None:
    """Each result to ``url`` in turn; after a failure the rest are not tried (the registry
    is most likely down, and each would wait for its timeout)."""
    mount_from = remote_push.siblings(api.ctx.config.cache.remotes, url)
    client = api.ctx.remote.client(Remote(url), timeout=60)
    try:
        failed = False
        for name, result in steps:
            done = Outcome(name, result.key, url, "not-tried")
            if not failed:
                done = await trio.to_thread.run_sync(
                    _push_one, api, hold, client, url, mount_from, name, result, key, summary.stats
                )
                failed = done.outcome == "failed"
            summary.outcomes.append(done)
            if done.outcome == "pushed":
                api.ctx.db.push_done(result.key, url)  # the queue need not push it again
            await api.send_event(conn, "progress", {"message": _said(done), "result": asdict(done)})
    finally:
        client.close()


def _push_one(
    api: Api,
    hold: Hold,
    client: RegistryClient,
    url: str,
    mount_from: list[str],
    name: str,
    result: Result,
    key: trust.SigningKey,
    stats: remote_push.PushStats,
) -> Outcome:
    repo = Remote(url).repository
    outcome = Outcome(name, result.key, url, "pushed")
    try:
        if remote_push.already_there(client, repo, result, key, __version__):
            outcome.outcome = "present"
            return outcome
        if not hold.complete(*_roots_of([result])):
            raise StoreError("its trees or log are no longer in the store (collected?)")
        outcome.bytes = remote_push.push_result(
            api.ctx.store,
            client,
            repo,
            result,
            key,
            __version__,
            mount_from=mount_from,
            stats=stats,
        )
        log.info("pushed %s to %s by hand (%d bytes)", result.key, url, outcome.bytes)
    except (OciError, StoreError, OSError) as exc:
        outcome.outcome, outcome.error = "failed", str(exc)
    return outcome


def _said(o: Outcome) -> str:
    what = f"step {o.step} ({o.key[:12]})" if o.step else f"key {o.key[:12]}"
    if o.outcome in ("pushed", "pulled"):
        size = f"{human_bytes(o.bytes)} {'uploaded' if o.outcome == 'pushed' else 'downloaded'}"
        return f"{o.outcome} {what} {'to' if o.outcome == 'pushed' else 'from'} {o.url}: {size}"
    if o.outcome == "present":
        return f"{what}: already {'on ' + o.url if o.url else 'in the store'}"
    if o.outcome == "not-tried":
        return f"{what}: not tried (an earlier push to {o.url} failed)"
    return f"{what}: {'not found' if o.outcome == 'missing' else o.outcome}: {o.error}"


# -- pull ----------------------------------------------------------------------------


def configured_or_admin(api: Api, conn: Connection, url: str, what: str) -> Remote:
    """A configured remote of ``url`` (with its own ``trust`` list); another URL is for
    root and the admin-group only (``pull --from``, ``build --cache-from``).

    A result read from a remote becomes a local hit for every user's builds,
    and an unconfigured URL has no trust list: anyone could otherwise bring in
    a result signed by a key trusted only for another repository (a PR host's).
    """
    known = {r.url: r for r in api.ctx.config.cache.remotes}
    if url in known:
        return known[url]
    api.require_admin(conn, f"{what} {url}, which is not a [[cache.remote]] of amberd.toml",
                      "others use the configured remotes")  # fmt: skip
    return Remote(url)


def _is_key(text: str) -> bool:
    return len(text) == HEX_SIZE and all(c in "0123456789abcdef" for c in text)


@operation(target=str, remote=(str | None, None))
async def pull(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    """Bring a step key's result, or every result of a build of the caller's, into the store."""
    target = args["target"]
    cache = _cache(api)
    if _is_key(target):
        wanted = [("", target, None)]
    else:
        record = api.record(conn, target)
        steps = api.ctx.db.get_steps(record.id)
        wanted = [(s.name, s.key, s) for s in steps if s.key and s.status in _WITH_RESULT]
        if not wanted:
            raise NotFound(f"build {record.id} has no step results (errored steps have none)")
    if args["remote"] is not None:
        remotes = [
            configured_or_admin(api, conn, _checked_url(args["remote"], "--from"), "pull from")
        ]
    else:
        remotes = list(cache.config.remotes)
    if not remotes:
        raise BadArgs("no remote to pull from: amberd.toml has no [[cache.remote]]; give --from")
    try:
        trusted = trust.load_trusted(cache.config.trusted_keys)
    except trust.TrustError as exc:
        raise ExportFailed(str(exc)) from None
    summary = Summary()
    with api.ctx.roots.writer(f"pull of {target}") as writer:
        for name, key, step in wanted:
            done = await _pull_one(api, writer, remotes, trusted, (name, key, step))
            summary.outcomes.append(done)
            await api.send_event(conn, "progress", {"message": _said(done), "result": asdict(done)})
    return summary.to_wire(target=target, urls=[r.url for r in remotes])


async def _pull_one(
    api: Api, writer: Hold, remotes: list[Remote], trusted: dict, wanted_step: tuple
) -> Outcome:
    """One key: present already, else through its remote record (a lazy hit), else from the
    first remote that has it trusted, its closure pulled (``ensure_local``)."""
    name, key, step = wanted_step
    db, cache = api.ctx.db, api.ctx.remote
    local = db.get_result(key)
    if (local is not None and _another(step, local) is None
            and await trio.to_thread.run_sync(writer.complete, *_roots_of([local]))):  # fmt: skip
        return Outcome(name, key, "", "present", host=local.host if local else None)
    reasons = []
    record = db.get_remote(key) if local is not None else None
    candidates = [(record.url, local)] if record is not None else []
    for remote in remotes:
        candidates.append((remote.url, None))
    for url, result in candidates:
        try:
            if result is None:
                found = await trio.to_thread.run_sync(_lookup, cache, Remote(url), key, trusted)
                if found is None:
                    reasons.append(f"not on {url}")
                    continue
                result = Result(**found.result)
                db.put_result(result, RemoteRecord(url, found.digest, found.raw))
            got = await cache.ensure_local(*_roots_of([result]), hold=writer)
        except remote_pull.Miss as miss:
            reasons.append(str(miss))
            continue
        done = Outcome(name or result.step, key, url, "pulled", got, host=result.host)
        why = _another(step, result)
        if why is not None:
            done.outcome, done.error = "failed", f"{url}: {why}"
        return done
    outcome = "missing" if all(r.startswith("not on ") for r in reasons) else "failed"
    return Outcome(name, key, remotes[-1].url, outcome, error="; ".join(reasons))


def _lookup(cache: Any, remote: Remote, key: str, trusted: dict) -> remote_pull.Found | None:
    client = cache.client(remote)
    try:
        return remote_pull.lookup(client, remote, key, trusted)
    finally:
        client.close()


def _another(step: Any, result: Result) -> str | None:
    """Why ``result`` is not the one a build's ``step`` recorded (None: it is)."""
    if step is not None and step.after_tree and step.after_tree != result.after_tree:
        return f"it holds another result of this key (tree {result.after_tree[:12]}, not {step.after_tree[:12]})"
    return None
