"""How one operation is declared: its handler and the shape of its arguments.

A module of its own so that handler modules can declare operations without
importing ``registry`` (which imports them all to build its one table).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amber.daemon.api.registry import Api
    from amber.daemon.server import Connection

Handler = Callable[["Api", "Connection", dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Operation:
    """A handler and the schema its arguments are checked against before it runs."""

    handler: Handler
    schema: dict[str, Any]
    takes_fds: bool = False  # whether a request may pass descriptors (SCM_RIGHTS)

    async def __call__(self, api: Api, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        return await self.handler(api, conn, args)


def operation(*, takes_fds: bool = False, **schema: Any) -> Callable[[Handler], Operation]:
    """Declare a handler's argument schema; ``registry.OPERATIONS`` gives it its name.

    Only an operation declared ``takes_fds`` accepts descriptors: any other
    request that brings some is refused, and they are closed at once rather
    than held for as long as the operation runs.
    """

    def declare(handler: Handler) -> Operation:
        return Operation(handler, schema, takes_fds)

    return declare
