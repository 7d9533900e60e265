"""The two ways a sandbox fails to run a command, as opposed to a command that fails."""

from __future__ import annotations

__all__ = ["CommandError", "SandboxError"]


class SandboxError(Exception):
    """The sandbox could not run the command: infrastructure trouble.

    Never raised for a command that ran and failed. ``reason`` is stable and
    machine-readable: ``tool-missing``, ``not-root``, ``root-missing``,
    ``setup-failed`` (bwrap refused: missing cwd, no ``/bin/sh``, a root its
    host uid cannot reach), ``id-map-failed``, ``stuck`` (processes that
    would not die).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CommandError(SandboxError):
    """The sandbox is fine but holds no command by that name it could run.

    ``status`` is what a shell exits with: 127 when nothing by that name is
    found, 126 when it is found but cannot be executed (``why`` says how).
    """

    def __init__(self, command: str, status: int, why: str) -> None:
        reason = "command-not-found" if status == 127 else "command-not-executable"
        super().__init__(reason, f"{command}: {why}")
        self.command = command
        self.status = status
        self.why = why
