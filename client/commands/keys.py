"""``amber key generate`` and ``amber key trust``: files only, no amberd (see client/keys.py)."""

from __future__ import annotations

from pathlib import Path

from ..cli import EXIT_OK, UsageError
from ..keys import generate, trust


def cmd_key_generate(ctx, ns) -> int:
    try:
        path, public = generate(ns.name, Path(ns.dir))
    except FileExistsError:
        raise UsageError(
            f"{Path(ns.dir) / (ns.name + '.key')} exists: a key is never overwritten"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    ctx.out.write(f"{path}\n{ns.name} {public}\n")
    return EXIT_OK


def cmd_key_trust(ctx, ns) -> int:
    try:
        trust(ns.name, ns.pubkey, Path(ns.file))
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK
