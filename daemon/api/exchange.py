"""``export`` and ``import``: frozen builds as OCI images, and back.

An export's layers are the build's initial tree (base and sources) and one
layer per step up to the exported state, so ``podman history`` reads like
the build. ``-o FILE`` is a file the client opened (client/userfiles.py):
amberd never resolves a path a user named, so a user cannot make it write
where they could not.

An import turns such an image (or any image) into a frozen build on this
machine: one step per layer after the first, the last one the failure, so
``amber shell`` and ``amber diff`` work on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from amber.client import __version__
from amber.daemon.api.operation import operation
from amber.daemon.build.buildid import make_build_id, safe_name
from amber.daemon.build.frozen import FrozenState, make_local, resolve_state
from amber.daemon.build.state import BuildStatus, StepStatus
from amber.daemon.context import DaemonContext
from amber.daemon.errors import (
    BadArgs,
    ExportFailed,
    ImageError,
    NotFound,
    PermissionDenied,
    TimedOut,
)
from amber.daemon.oci.auth import Credentials, credentials_for, wire_credentials
from amber.daemon.oci.digests import LayerDigests, PushKey
from amber.daemon.oci.image import ExportResult, export_image, is_local_source, read_image
from amber.daemon.oci.layer import KnownLayer, LayerInfo
from amber.daemon.oci.registry import push_image
from amber.daemon.oci.spec import (
    ImageConfig,
    OciError,
    display_reference,
    parse_reference,
    qualified_name,
    rfc3339,
)
from amber.daemon.oci.stream import stream_docker_archive
from amber.daemon.oci.tarstream import file_copier
from amber.daemon.storage.db import BuildRecord, StepRecord
from amber.daemon.userthreads import run_as_user
from amber.sandbox.asuser import HelperError, HelperTimeout, User, UserReader
from amber.sandbox.beneath import openat2
from amber.sandbox.digest import from_hex
from amber.sandbox.fsidentity import filesystem_identity
from amber.sandbox.store import StoreError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from amber.daemon.api.registry import Api
    from amber.daemon.server import Connection
    from amber.sandbox.store import Store

log = logging.getLogger(__name__)
LABEL = "org.amber."
#: The ``auth`` argument: ``{registry host: {username, password}}``, the user's own.
AUTH_ARG = (dict[str, dict[str, str]] | None, None)


def request_credentials(auth: dict | None, ref: str) -> Credentials | None:
    """The credentials the user sent for the registry ``ref`` names, else None."""
    from amber.daemon.oci.registry import registry_target

    try:
        table = wire_credentials(auth)
        return credentials_for(table, registry_target(ref).registry) if table else None
    except (ValueError, OciError) as exc:
        raise BadArgs(str(exc)) from None


def image_layers(
    ctx: DaemonContext, state: FrozenState
) -> tuple[list[tuple[bytes | None, bytes]], list[str]]:
    """(before, after) tree pairs from the initial tree to ``state``, with history lines."""
    steps = ctx.db.get_steps(state.build.id)
    upto = state.step.idx if state.before else state.step.idx + 1
    base = state.build.base_tree or (steps[0].before_tree if steps else None)
    if base is None:
        raise NotFound(f"build {state.build.id} never laid out its initial tree")
    layers: list[tuple[bytes | None, bytes]] = [(None, from_hex(base))]
    history = [f"amber: base {state.build.base} and sources"]
    for step in steps[:upto]:
        if not (step.before_tree and step.after_tree):
            raise NotFound(f"step {step.name} of {state.build.id} has no recorded state")
        layers.append((from_hex(step.before_tree), from_hex(step.after_tree)))
        history.append(f"amber: step {step.name} ({step.status})")
    return layers, history


def image_config(state: FrozenState, history: list[str]) -> ImageConfig:
    step = state.step
    labels = {
        LABEL + "build": state.build.id,
        LABEL + "spec": state.build.name,
        LABEL + "step": step.name,
        LABEL + "state": "before" if state.before else "after",
        LABEL + "key": step.key or "",
        LABEL + "exit-code": "" if step.exit_code is None else str(step.exit_code),
        LABEL + "status": step.status,
        LABEL + "run": state.run,
        LABEL + "user": state.user,
    }
    return ImageConfig(
        env=dict(state.env), workdir=state.cwd, cmd=["/bin/sh"], labels=labels, history=history,
        created=rfc3339(state_time(state)),
    )  # fmt: skip


def state_time(state: FrozenState) -> float:
    """When the exported state came to be: the image's ``created``, so that
    exporting the same state twice writes the same bytes."""
    step, build = state.step, state.build
    if step.started is not None:
        return step.started + (0 if state.before else step.seconds or 0)
    return build.finished or build.created


@operation(
    takes_fds=True,
    build=str,
    before=(bool, False),
    step=(str | None, None),
    output=(str | None, None),
    format=(str, "oci"),
    push=(str | None, None),
    insecure=(bool, False),
    stream=(bool, False),
    tag=(str | None, None),
    auth=AUTH_ARG,
)
async def export(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    # The descriptor is ours from here on, whatever happens: a refused export
    # must close it at once, or the client would wait on the pipe for ever.
    fds = conn.take_fds(conn.request_fds)
    try:
        return await _export_with(api, conn, args, fds)
    finally:
        for fd in fds:
            os.close(fd)


async def _export_with(
    api: Api, conn: Connection, args: dict[str, Any], fds: list[int]
) -> dict[str, Any]:
    record = api.record(conn, args["build"])
    wanted = [args["output"] is not None, args["push"] is not None, args["stream"]]
    if sum(wanted) != 1:
        raise BadArgs(
            "give exactly one of an output file (-o), a registry reference (--push) "
            "or a stream (--to-engine)",
        )
    stream_fd = _stream_fd(fds) if args["stream"] else None
    output_fd = _output_fd(fds) if args["output"] is not None else None
    tag = _engine_tag(args["tag"]) if args["tag"] is not None else None
    if tag is not None and stream_fd is None:
        raise BadArgs("a tag goes with a stream (--to-engine)")
    if args["format"] not in ("oci", "docker-archive"):
        raise BadArgs(f"format must be oci or docker-archive, not {args['format']!r}")
    state = resolve_state(api.ctx.db, record, step=args["step"], before=args["before"])
    result = await export_state(api.ctx, state, uid=conn.peer.uid, gid=conn.peer.gid, output=args["output"],
                                fmt=args["format"], push=args["push"], insecure=args["insecure"],
                                stream_fd=stream_fd, output_fd=output_fd, tag=tag,
                                credentials=request_credentials(args["auth"], args["push"]) if args["push"] else None)  # fmt: skip
    return result


def _stream_fd(fds: list[int]) -> int:
    """The pipe or socket to write a streamed export to; nothing else is written to.

    The client made it and passed it over: writing to it reaches nothing
    the client could not reach itself.
    """
    if len(fds) != 1:
        raise BadArgs(f"a stream export needs one descriptor, {len(fds)} came")
    mode = os.fstat(fds[0]).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        raise BadArgs("a stream export writes to a pipe or a socket only")
    return fds[0]


def _output_fd(fds: list[int]) -> int:
    """The file ``-o FILE`` names, opened by the client: amberd never looks that path up.

    Root resolving a path the user named would pass directories the user
    cannot (CAP_SYS_PTRACE and ``/proc/PID/cwd``), whatever its fsuid.
    """
    if not fds:
        raise BadArgs(
            f"this amberd writes an export only to a file the client opened; upgrade amber "
            f"(the client) to {__version__}, the daemon's version"
        )
    if len(fds) != 1:
        raise BadArgs(f"an export to a file needs one descriptor, {len(fds)} came")
    flags = fcntl.fcntl(fds[0], fcntl.F_GETFL)
    if not stat.S_ISREG(os.fstat(fds[0]).st_mode):
        raise BadArgs("an export to a file writes to a regular file only")
    if flags & os.O_ACCMODE == os.O_RDONLY or flags & os.O_APPEND:
        raise BadArgs("the export's file must be open for writing, and not in append mode")
    return fds[0]


def _engine_tag(tag: str) -> str:
    """The user's ``NAME[:TAG]``, checked: the engine names the loaded image with it."""
    try:
        ref = parse_reference(tag)
    except OciError as exc:
        raise BadArgs(str(exc)) from None
    if ref.digest:
        raise BadArgs(f"{tag!r}: a tag names an image, a digest cannot")
    return tag if ref.tag else f"{tag}:latest"


async def export_state(
    ctx: DaemonContext, state: FrozenState, *, uid: int, gid: int, output: str | None, fmt: str, push: str | None,
    insecure: bool, stream_fd: int | None = None, output_fd: int | None = None,
    output_dir: int | None = None, tag: str | None = None,
    credentials: Credentials | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Export, push or stream ``state``; shared by ``amber export`` and ``--export-on-failure``."""
    layers, history = image_layers(ctx, state)
    config = image_config(state, history)
    ref = f"amber/{state.build.id}:{state.step.name}{'-before' if state.before else ''}"
    note = ("the host base's system directories (/usr, /etc, ...) are bound at run time and not in the image"
            if state.build.base == "host" else None)  # fmt: skip
    digests = LayerDigests(ctx.config.state_dir / "layer-digests.db")
    # The layer tables are SQLite: read and written on a worker thread, never the loop's.
    known, pushed = await trio.to_thread.run_sync(_known, digests, layers, push)
    written: list[LayerInfo] = []

    def write() -> dict[str, Any]:
        try:
            if push is not None:
                (ctx.config.state_dir / "tmp").mkdir(mode=0o700, exist_ok=True)
                digest = push_image(ctx.store, layers, config, push, insecure=insecure,
                                    tmp_dir=ctx.config.state_dir / "tmp", credentials=credentials,
                                    layer_cache=pushed)  # fmt: skip
                return {"ref": push, "digest": digest, "layers": len(layers)}
            if stream_fd is not None:
                name = tag or qualified_name(display_reference(ref))
                with open(stream_fd, "wb", buffering=1 << 20, closefd=False) as f:
                    streamed = stream_docker_archive(ctx.store, layers, config, f.write, tag=name,
                                                     copy=file_copier(f), known=known)  # fmt: skip
                written.extend(streamed.infos)
                return {"name": name, "digest": streamed.config_digest, "layers": streamed.layers,
                        "size": streamed.size}  # fmt: skip
            result = _export_file(ctx.store, layers, config, fmt, ref, known, output_fd,
                                  (output_dir, output), (uid, gid))  # fmt: skip
            written.extend(result.layers)
            return {"path": output, "digest": result.manifest_digest, "layers": len(layers),
                    "size": result.size, "name": result.name}  # fmt: skip
        except BrokenPipeError:
            raise ExportFailed("the reader of the stream went away") from None
        except PermissionError as exc:
            raise PermissionDenied(f"cannot write {output}: {exc.strerror}") from None
        except (OciError, OSError) as exc:
            raise ExportFailed(str(exc)) from None

    with ctx.roots.hold(f"pull for the export of {state.build.id}") as pulled:
        await make_local(ctx, pulled, [t for pair in layers for t in pair if t], state.label)
        result = await trio.to_thread.run_sync(_held_write, ctx, state, layers, write)
    await trio.to_thread.run_sync(_remember_layers, digests, layers, written, pushed)
    if note:
        result["note"] = note
    return result


def _held_write(
    ctx: DaemonContext, state: FrozenState, layers: list, write: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``write`` the export under a temp root: a GC running meanwhile cannot take a layer
    from under the writer. No walk proves the state whole first: writing it reads
    every tree (verified) and opens every blob it needs."""
    with ctx.roots.hold(f"export of {state.build.id}") as hold:
        hold.add([after for _, after in layers])
        try:
            return write()
        except StoreError as exc:
            raise NotFound(
                f"the state of {state.label} is no longer complete in the store ({exc})"
            ) from None


def _known(
    digests: LayerDigests, layers: list[tuple[bytes | None, bytes]], push: str | None
) -> tuple[dict[tuple[bytes | None, bytes], KnownLayer], dict[PushKey, LayerInfo]]:
    """What the tables know of ``layers``: for an export, their digests; for a push, its layers."""
    if push is None:
        return _known_layers(digests, layers), {}
    return {}, _known_pushed(digests, layers)


def _known_layers(
    digests: LayerDigests, layers: list[tuple[bytes | None, bytes]]
) -> dict[tuple[bytes | None, bytes], KnownLayer]:
    """The digests of layers exported before; none if the table cannot be read."""
    try:
        return digests.lookup(layers)
    except (sqlite3.Error, OSError) as exc:
        log.warning("layer digests unreadable, hashing every layer: %s", exc)
        return {}


def _known_pushed(
    digests: LayerDigests, layers: list[tuple[bytes | None, bytes]]
) -> dict[PushKey, LayerInfo]:
    """The compressed layers pushed before (push_image's defaults: gzip, level 1)."""
    try:
        return digests.lookup_pushed([(b or b"", a, "gzip", 1) for b, a in layers])
    except (sqlite3.Error, OSError) as exc:
        log.warning("pushed layer digests unreadable, writing every layer: %s", exc)
        return {}


def _remember_layers(
    digests: LayerDigests,
    layers: list[tuple[bytes | None, bytes]],
    written: list[LayerInfo],
    pushed: dict[PushKey, LayerInfo],
) -> None:
    """Record what was written: uncompressed layers in order, and a push's layer cache."""
    try:
        if written:
            digests.remember(layers, written)
        if pushed:
            digests.remember_pushed(pushed)
    except (sqlite3.Error, OSError) as exc:
        log.warning("layer digests not recorded: %s", exc)


def _export_file(store: Store, layers: list, config: ImageConfig, fmt: str, ref: str,
                 known: Mapping[Any, KnownLayer], output_fd: int | None, where: tuple[int | None, str | None],
                 ids: tuple[int, int]) -> ExportResult:  # fmt: skip
    """To the file the client opened (it renames it), or below the directory it opened, as the user."""
    if output_fd is not None:
        with open(output_fd, "wb", buffering=1 << 20, closefd=False) as f:
            return export_image(store, layers, config, f, fmt, ref=ref, known=known)  # type: ignore[arg-type]
    dir_fd, output = where
    assert dir_fd is not None and output is not None  # --export-on-failure
    with filesystem_identity(*ids):
        return _export_beneath(store, layers, config, fmt, ref, known, (dir_fd, output))


def _export_beneath(store: Store, layers: list, config: ImageConfig, fmt: str, ref: str,
                    known: Mapping[Any, KnownLayer], where: tuple[int, str]) -> ExportResult:  # fmt: skip
    """Write the image in ``where`` (a directory fd, a path naming the file): aside first,
    one component, no link followed."""
    dir_fd, name = where[0], os.path.basename(where[1])
    part = f".{name}.{secrets.token_hex(6)}.part"
    fd = openat2(dir_fd, part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with open(fd, "wb", buffering=1 << 20) as f:
            result = export_image(store, layers, config, f, fmt, ref=ref, known=known)  # type: ignore[arg-type]
        with contextlib.suppress(FileNotFoundError):
            # Unlinking first spares ext4's flush of data renamed over a file.
            os.unlink(name, dir_fd=dir_fd)
        os.rename(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part, dir_fd=dir_fd)
        raise
    return result


@operation(source=str, insecure=(bool, False), auth=AUTH_ARG)
async def import_image(api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
    source = args["source"]
    credentials = None if is_local_source(source) else request_credentials(args["auth"], source)

    def work():
        peer = conn.peer
        try:
            with contextlib.ExitStack() as stack:
                # A local image is opened by a helper that is the client (sandbox/asuser.py).
                reader = (stack.enter_context(UserReader(User(peer.uid, peer.gid, peer.groups)))
                          if is_local_source(source) else None)  # fmt: skip
                image = read_image(source, hold.store, insecure=args["insecure"], reader=reader,
                                   max_size=api.ctx.config.import_max_size, credentials=credentials)  # fmt: skip
            hold.checkpoint(image.trees)  # held before the build record refers to them
            return image
        except PermissionError as exc:
            raise PermissionDenied(f"cannot read {source}: {exc.strerror}") from None
        except HelperTimeout as exc:
            raise TimedOut(f"cannot read {source}: {exc}") from None
        except HelperError as exc:
            raise PermissionDenied(f"cannot read {source}: {exc}") from None
        except FileNotFoundError:
            raise NotFound(f"no image at {source}") from None
        except (OciError, OSError, ValueError) as exc:
            raise ImageError(f"{source}: {exc}") from None

    with api.ctx.roots.writer(f"import of {source}") as hold:
        uid = conn.peer.uid if is_local_source(source) else 0  # a helper of the user's reads it
        image = await run_as_user(uid, work)
        if len(image.trees) < 1:
            raise ImageError(f"{source} has no layers")
        record, steps = _frozen_records(api, image, source, conn.peer.uid)
        api.ctx.db.insert_build(record, steps)
    return {"build": record.id, "steps": [s.name for s in steps], "failed_step": record.failed_step}


def _frozen_records(api: Api, image, source: str, uid: int) -> tuple[BuildRecord, list[StepRecord]]:
    labels = image.config.labels
    # The label is the image's word, not amberd's: cut down to a name (it becomes paths).
    name = safe_name(labels.get(LABEL + "spec") or "imported", "imported")
    seq = api.ctx.db.next_seq()
    build_id = make_build_id(name, seq)
    trees = [t.hex() for t in image.trees]
    definition = json.dumps(
        {
            "cwd": image.config.workdir or "/",
            "env": image.config.env,
            "run": labels.get(LABEL + "run", ""),
            "user": labels.get(LABEL + "user", "root"),
        }
    )
    history = image.config.history
    steps: list[StepRecord] = []
    for i in range(1, len(trees)):
        title = history[i] if i < len(history) else ""
        step_name = (
            title.removeprefix("amber: step ").split(" (")[0]
            if title.startswith("amber: step ")
            else f"layer{i}"
        )
        steps.append(StepRecord(build_id=build_id, idx=i - 1, name=step_name, key=None, status=StepStatus.RAN,
                                before_tree=trees[i - 1], after_tree=trees[i], definition=definition))  # fmt: skip
    if not steps:  # a single-layer image: a state with nothing before it
        steps.append(StepRecord(build_id=build_id, idx=0, name="image", key=None, status=StepStatus.RAN,
                                before_tree=trees[0], after_tree=trees[0], definition=definition))  # fmt: skip
    last = steps[-1]
    exit_code = labels.get(LABEL + "exit-code")
    last.status = labels.get(LABEL + "status", StepStatus.FAILED)
    last.exit_code = int(exit_code) if exit_code and exit_code.lstrip("-").isdigit() else None
    record = BuildRecord(
        id=build_id, seq=seq, uid=uid, name=name,
        spec=json.dumps({"build": {"name": name, "base": f"imported:{source}"},
                         "imported_from": labels.get(LABEL + "build")}),
        spec_path=source, status=BuildStatus.FAILED, frozen=1, created=time.time(), finished=time.time(),
        failed_step=last.name, base_tree=trees[0], final_tree=trees[-1],
    )  # fmt: skip
    return record, steps


async def export_on_failure(ctx: DaemonContext, build) -> None:
    """``amber build --export-on-failure``: export the state at failure at once."""
    record = ctx.db.get_build(build.id)
    assert record is not None
    state = resolve_state(ctx.db, record, step=None, before=False)
    how = build.export_on_failure
    output = None
    if how != "registry":  # the client opened the directory: export_path's, or the spec's
        output = build.export_path or os.path.join(
            os.path.dirname(build.spec_path), f"amber-{build.id}.tar"
        )
    result = await export_state(ctx, state, uid=build.uid, gid=build.gid, output=output,
                                output_dir=build.export_dir,
                                fmt="oci" if how == "registry" else how, push=build.export_ref if how == "registry" else None,
                                insecure=False)  # fmt: skip
    where = result.get("path") or result.get("ref")
    message = f"exported the state at failure to {where} ({result['layers']} layers)"
    build.note(message)
