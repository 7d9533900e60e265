"""Third-party tools the tests check amber's outputs with.

``scripts/setup --test`` installs every one of them, so a missing tool is a
broken test machine, not a reason to skip: ``need`` fails the test and says
how to fix it.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/setup --test", False)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; a failure shows its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd[0]} failed ({done.returncode}): {done.stderr}{done.stdout}"
    return done
