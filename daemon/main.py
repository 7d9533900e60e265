"""amberd: the build sandbox daemon.

    amberd [--state-dir DIR] [--socket PATH] [--config FILE] [--jobs N]
    amberd --check | --print-config

Runs in the foreground, after checking what it needs from the machine
(``preflight.py``: exit 78 with the reason when something is missing). Under systemd it takes its socket from socket
activation and reports readiness with sd_notify; anywhere else it binds the
socket itself. SIGTERM or SIGINT stop it cleanly: no new builds, running
steps get ``stop-grace`` seconds, then are cancelled (``errored``, never
cached), everything is unmounted, exit status 0.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

import trio

from amber.client import __version__
from amber.daemon import preflight, systemd
from amber.daemon.api.exchange import export_on_failure
from amber.daemon.api.registry import Api
from amber.daemon.build.manager import BuildManager
from amber.daemon.build.recovery import lock_state_dir, recover, unlock_state_dir, unmount_leftovers
from amber.daemon.build.state import BuildStatus
from amber.daemon.config import DEFAULT_CONFIG, Config, ConfigError, current_config, load_config
from amber.daemon.context import DaemonContext, open_context
from amber.daemon.remote.credentials import CredentialsError
from amber.daemon.remote.service import RemoteCache
from amber.daemon.remote.trust import TrustError
from amber.daemon.server import Limits, listen, serve
from amber.daemon.storage.gc import serve_auto_gc
from amber.sandbox.fsmode import FsMode, FsModeError, detect_fs_mode
from amber.sandbox.mounts import enter_private_namespace

log = logging.getLogger("amber")

EX_CONFIG = 78  # sysexits.h; amberd.service does not restart on it (RestartPreventExitStatus)
STATUS_INTERVAL = 1.0  # seconds between checks of what STATUS= should say
UNMOUNT_ALLOWANCE = 30.0  # seconds asked of systemd for stopping, beyond stop-grace
FINAL_REPLIES = 2.0  # seconds clients get to receive their builds' outcomes once all have ended

_LEVEL_PREFIXES = {
    logging.DEBUG: "<7>",
    logging.INFO: "<6>",
    logging.WARNING: "<4>",
    logging.ERROR: "<3>",
    logging.CRITICAL: "<2>",
}


class JournalFormatter(logging.Formatter):
    """One event a line with its syslog level (``<3>``); journald adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        return _LEVEL_PREFIXES.get(record.levelno, "<6>") + text


def setup_logging(verbose: bool) -> None:
    """One event a line on stderr; syslog priority prefixes under journald."""
    level = logging.DEBUG if verbose else logging.INFO
    if systemd.journal_stream():
        formatter: logging.Formatter = JournalFormatter("%(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)


def fail(message: str, status: int = 1) -> NoReturn:
    """Exit with ``amberd: message`` on stderr (each line), as an error to the journal."""
    prefix = "<3>" if systemd.journal_stream() else ""
    for line in message.splitlines():
        sys.stderr.write(f"{prefix}amberd: {line}\n")
    sys.stderr.flush()
    sys.exit(status)


async def run_daemon(
    config: Config,
    *,
    notifier: systemd.Notifier | None = None,
    fs_mode: FsMode | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Recover, serve until SIGTERM or SIGINT, stop cleanly.

    The service manager hears ``READY=1`` only once recovery is done and the
    socket is served, so nothing a crashed predecessor left is visible to
    the first client. On the first signal: stop accepting, let running
    steps finish within ``stop-grace``, cancel the rest; a second signal
    cancels them at once.
    """
    notifier = notifier or systemd.Notifier()
    notifier.status("recovering: cleaning up after the previous amberd")
    config.state_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_state_dir(config.state_dir)
    try:
        ctx = open_context(config, fs_mode)
        log.info("build roots: %s mode (%s)", ctx.fs_mode.name, ctx.fs_mode.reason)
        ctx.export_hook = functools.partial(export_on_failure, ctx)
        ctx.remote = RemoteCache(ctx)
        try:
            report = await trio.to_thread.run_sync(recover, ctx)
            if any(report.values()):
                log.info("recovery: %s", ", ".join(f"{k}={v}" for k, v in report.items()))
            listener, inherited = _open_listener(config)
            try:
                await _serve(ctx, listener, notifier, task_status)
            finally:
                listener.close()
                if not inherited:
                    config.socket.unlink(missing_ok=True)
                await trio.to_thread.run_sync(unmount_leftovers, ctx.mount_dir)
        finally:
            ctx.complete.close()
            ctx.db.close()
    finally:
        unlock_state_dir(lock)
    log.info("stopped")


def _open_listener(config: Config) -> tuple[trio.socket.SocketType, bool]:
    """The socket systemd passed (True), else one bound at ``config.socket`` (False)."""
    inherited = systemd.listen_fds()
    if not inherited:
        listener = listen(config.socket, mode=config.socket_mode, group=config.socket_group)
        log.info("listening on %s", config.socket)
        return listener, False
    sock, *extra = inherited
    for other in extra:
        log.warning("ignoring socket fd %d passed by systemd: amberd needs one", other.fileno())
        other.close()
    if (
        sock.family != socket.AF_UNIX
        or sock.type != socket.SOCK_STREAM
        or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        raise OSError(
            errno.EINVAL,
            "the socket systemd passed is not a listening Unix stream socket "
            "(amberd.socket needs ListenStream= and Accept=no)",
        )
    log.info("listening on %s, passed by systemd", sock.getsockname() or "an unnamed socket")
    return trio.socket.from_stdlib_socket(sock), True


async def _serve(ctx: DaemonContext, listener, notifier: systemd.Notifier, task_status) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # Connections outlive accepting: a client following a build gets its
        # outcome (errored, with the reason) rather than a dropped connection.
        async with trio.open_nursery() as connections:
            await _run_until_stopped(ctx, listener, notifier, task_status, signals, connections)
            with trio.move_on_after(FINAL_REPLIES):
                while connections.child_tasks:
                    await trio.sleep(0.05)
            connections.cancel_scope.cancel()
        await ctx.lowers.aclose()
        await ctx.fs_pool.aclose()
        notifier.status("stopping: unmounting")


async def _run_until_stopped(
    ctx: DaemonContext,
    listener,
    notifier: systemd.Notifier,
    task_status,
    signals,
    connections: trio.Nursery,
) -> None:
    """Serve until a signal; then stop accepting and let builds end (see ``stop-grace``)."""
    config = ctx.config
    async with trio.open_nursery() as builds_nursery:
        manager = BuildManager(ctx, builds_nursery)
        status = _Status(notifier, manager)
        api = Api(ctx, manager)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, api, listener, Limits.from_config(config), connections)
            nursery.start_soon(serve_auto_gc, ctx)
            nursery.start_soon(ctx.remote.serve_pushes)
            status.send_ready()
            builds_nursery.start_soon(status.keep_current)
            builds_nursery.start_soon(ctx.lowers.run)
            task_status.started(ctx)
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()  # stop serving requests
        # Stop accepting now: under systemd, connections made from here on
        # wait in the socket's queue for the next amberd instead of in ours.
        listener.close()
        ctx.stopping = True
        status.stop_deadline = trio.current_time() + config.stop_grace
        log.info(
            "stopping: no new builds or steps; %d running step(s) get %g s to finish "
            "(signal again to cancel them now)",
            status.counts()[0],
            config.stop_grace,
        )
        status.send_stopping(needs=config.stop_grace + UNMOUNT_ALLOWANCE)
        async with trio.open_nursery() as stopping:
            stopping.start_soon(_cancel_on_next_signal, signals, manager)
            await manager.stop(config.stop_grace)
            stopping.cancel_scope.cancel()
        builds_nursery.cancel_scope.cancel()


async def _cancel_on_next_signal(signals, manager: BuildManager) -> None:
    async for signum in signals:
        log.info("received %s again: cancelling running steps now", signal.Signals(signum).name)
        await manager.stop(0)
        return


class _Status:
    """The one line ``systemctl status amberd`` shows under the unit (``STATUS=``)."""

    def __init__(self, notifier: systemd.Notifier, manager: BuildManager) -> None:
        self.notifier = notifier
        self.manager = manager
        self.stop_deadline: float | None = None  # trio time at which steps are cancelled
        self._sent: str | None = None

    def counts(self) -> tuple[int, int]:
        """Builds running a step (or between two), builds waiting for a job slot."""
        builds = self.manager.running()
        running = sum(1 for b in builds if b.status == BuildStatus.RUNNING)
        return running, len(builds) - running

    def line(self) -> str:
        running, queued = self.counts()
        if self.stop_deadline is not None:
            if not running:
                return "stopping: no steps running"
            left = max(0.0, self.stop_deadline - trio.current_time())
            return f"stopping: waiting for {running} running step(s), cancelled in {left:.0f} s"
        line = f"ready: {running} build(s) running"
        return line + (f", {queued} queued" if queued else "")

    def send_ready(self) -> None:
        self._sent = self.line()
        self.notifier.ready(self._sent)

    def send_stopping(self, *, needs: float) -> None:
        self._sent = self.line()
        self.notifier.stopping(self._sent, needs=needs)

    async def keep_current(self) -> None:
        """Send the line whenever it changes, checked every ``STATUS_INTERVAL``."""
        while True:
            line = self.line()
            if line != self._sent:
                self.notifier.status(line)
                self._sent = line
            await trio.sleep(STATUS_INTERVAL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="amberd",
        description="amber's build daemon: mounts each build's content-addressed root, runs its steps "
        "in namespace sandboxes and caches every result.",
    )
    parser.add_argument(
        "--state-dir", type=Path, help="store, database and mounts (default /var/lib/amber)"
    )
    parser.add_argument(
        "--socket", type=Path, help="socket to listen on (default /run/amber/amberd.sock)"
    )
    parser.add_argument(
        "--config", type=Path, help="config file (default /etc/amber/amberd.toml if present)"
    )
    parser.add_argument("--jobs", type=int, help="builds running at once")
    parser.add_argument(
        "--stop-grace", type=float, help="seconds running steps may finish on SIGTERM (default 30)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check what amberd needs from this machine (kernel, /dev/fuse, bwrap, setpriv, the "
        "state directory, free space), print each check with ok or FAIL, and exit: 0 when all "
        "pass, 78 otherwise. amberd runs the same checks at every start",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the configuration amberd would run with (defaults, the config file, these "
        "flags): every option, commented, as TOML amberd accepts back as its config file",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"amberd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    notifier = systemd.Notifier.from_environment()
    if os.geteuid() != 0 and not (args.check or args.print_config):
        fail("must run as root (it mounts FUSE and overlay filesystems and maps user namespaces)")
    try:
        config = load_config(
            args.config,
            {
                "state_dir": args.state_dir,
                "socket": args.socket,
                "jobs": args.jobs,
                "stop_grace": args.stop_grace,
            },
        )
    except ConfigError as exc:
        notifier.status(f"configuration error: {exc}")
        fail(str(exc), EX_CONFIG)
    if args.print_config:
        sys.stdout.write(current_config(config, _config_source(args.config)))
        return
    found: FsMode | FsModeError | None = None
    if os.geteuid() == 0:  # the probes mount; another user's --check says root is needed
        try:
            found = detect_fs_mode(config.fs_mode)
        except FsModeError as exc:  # the kernel check says so, with the others
            found = exc
    report = preflight.run_checks(config, found)
    if args.check:
        for check in report.checks:
            print(check.line())
        sys.exit(0 if report.ok else EX_CONFIG)
    if not report.ok:
        first = report.failures[0]
        notifier.status(f"preflight failed: {first.name}: {first.message}")
        fail("\n".join(f"cannot start: {c.name}: {c.message}" for c in report.failures), EX_CONFIG)
    for check in report.warnings:
        log.warning("preflight: %s: %s", check.name, check.message)
    log.info("preflight passed; build roots: mode %s", report.root_mode)
    try:
        enter_private_namespace()
    except OSError as exc:
        fail(f"cannot make a private mount namespace for build roots: {exc}")
    try:
        trio.run(functools.partial(run_daemon, config, notifier=notifier, fs_mode=report.fs_mode))
    except (CredentialsError, TrustError) as exc:  # [cache] files amberd reads at start
        notifier.status(f"configuration error: {exc}")
        fail(str(exc), EX_CONFIG)
    except OSError as exc:
        notifier.status(f"failed: {exc}")
        fail(str(exc))


def _config_source(path: Path | None) -> str:
    if path is not None:
        return str(path)
    if DEFAULT_CONFIG.exists():
        return str(DEFAULT_CONFIG)
    return f"none ({DEFAULT_CONFIG} does not exist)"


if __name__ == "__main__":
    main()
