"""Limits as the policy holds them: looked up by client name, checked through ``Admission``.

The counting itself (windows, requests in flight, a shared store) is the
usage stage's ``Limiter``; the per-request path only asks it one question.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from extproc.config.model import Limit, Limits, StoreFailure


class Refusal(NamedTuple):
    status: int  # 429 over a limit, 503 when limits cannot be checked (store down, closed)
    limit: str  # the label: requests_per_minute, tokens, concurrent, store, syncing (unread)
    retry_after: int  # seconds
    message: str


class Admission(Protocol):
    def admit(
        self,
        client: str,
        limit: Limit,
        on_store_error: StoreFailure,
        budgets: BudgetAdmission | None = None,
        teams: tuple[str, ...] = (),
    ) -> Refusal | None:
        """None to go on (the request is then counted), or why not; ``budgets`` are asked
        last, in the same step, so a request they refuse is not counted."""
        ...


class BudgetAdmission(Protocol):
    def admit(self, client: str, teams: tuple[str, ...] = ()) -> Refusal | None:
        """None to go on (a reservation is then held until the request's usage record), or
        the 429 naming the budget, what was spent and when it resets."""
        ...


@dataclass(frozen=True, slots=True)
class LimitTable:
    """The configured limits, by client name (a lookup, never a walk over clients)."""

    default: Limit
    clients: Mapping[str, Limit] = field(default_factory=dict)
    on_store_error: StoreFailure = StoreFailure.OPEN

    @classmethod
    def of(cls, limits: Limits) -> LimitTable:
        return cls(limits.default, dict(limits.clients), limits.on_store_error)

    def for_client(self, client: str) -> Limit:
        return self.clients.get(client, self.default)
