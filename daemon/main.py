"""amberd: the build sandbox daemon.

    amberd [--state-dir DIR] [--socket PATH] [--config FILE] [--jobs N]

Runs in the foreground. Under systemd it takes its socket from socket
activation and reports readiness with sd_notify; anywhere else it binds the
socket itself. SIGTERM or SIGINT stop it cleanly: no new builds, running
steps get ``stop-grace`` seconds, then are cancelled (``errored``, never
cached), everything is unmounted, exit status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from amber.client import __version__

from . import (
    inspect_ops,  # noqa: F401  (registers its operations)
    systemd,
)
from .api import Api
from .config import Config, ConfigError, load_config
from .context import open_context
from .manager import BuildManager
from .recovery import recover
from .server import listen, serve

log = logging.getLogger("amber")


def setup_logging(verbose: bool) -> None:
    """One event a line on stderr; syslog priority prefixes under journald."""
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("JOURNAL_STREAM"):
        prefixes = {
            logging.DEBUG: "<7>",
            logging.INFO: "<6>",
            logging.WARNING: "<4>",
            logging.ERROR: "<3>",
            logging.CRITICAL: "<2>",
        }

        class JournalFormatter(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                text = super().format(record).replace("\n", " | ")
                return prefixes.get(record.levelno, "<6>") + text

        formatter: logging.Formatter = JournalFormatter("%(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)


async def run_daemon(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    ctx = open_context(config)
    report = await trio.to_thread.run_sync(recover, ctx)
    if any(report.values()):
        log.info("recovery: %s", ", ".join(f"{k}={v}" for k, v in report.items()))
    inherited = systemd.listen_fds()
    if inherited:
        listener = trio.socket.from_stdlib_socket(inherited[0])
        log.info("listening on the socket systemd passed")
    else:
        listener = listen(config.socket, mode=config.socket_mode, group=config.socket_group)
        log.info("listening on %s", config.socket)
    try:
        async with trio.open_nursery() as builds_nursery:
            manager = BuildManager(ctx, builds_nursery)
            api = Api(ctx, manager)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, api, listener, config.max_frame)
                systemd.notify(f"READY=1\nSTATUS=ready: state in {config.state_dir}")
                task_status.started(ctx)
                await _wait_for_stop_signal()
                log.info("stopping: no new builds; running steps get %g s", config.stop_grace)
                systemd.notify("STOPPING=1\nSTATUS=stopping")
                nursery.cancel_scope.cancel()  # stop accepting and serving requests
            await manager.stop(config.stop_grace)
            builds_nursery.cancel_scope.cancel()
    finally:
        listener.close()
        if not inherited:
            config.socket.unlink(missing_ok=True)
        ctx.db.close()
        log.info("stopped")


async def _wait_for_stop_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            return


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
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"amberd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if os.geteuid() != 0:
        sys.exit(
            "amberd: must run as root (it mounts FUSE and overlay filesystems and maps user namespaces)"
        )
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
        sys.exit(f"amberd: {exc}")
    try:
        trio.run(run_daemon, config)
    except OSError as exc:
        sys.exit(f"amberd: {exc}")


if __name__ == "__main__":
    main()
