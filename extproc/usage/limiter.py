"""Limits per gateway client on the organisation's key, checked when a request starts.

Only requests that would spend the server's credential are checked (the
processor calls ``admit`` only for those); a client-paid request never is.
Windows are fixed and aligned to the epoch (a minute for requests, the
configured window for tokens), so every replica counts into the same keys.
Token limits compare what has been counted so far: a request in flight is
charged when its response ends, so a client may overshoot by what its
requests in flight go on to use. A client whose shared counts this replica
has not read yet gets one request until they are read (the store reads them
at once); its others meanwhile get 429 ``syncing`` with retry-after 1 s.
A request admitted is counted in the same step as it is checked: a minute's
request and one in flight (a lease, ended by its usage record).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping

from extproc.config.model import Limit, Limits, StoreFailure
from extproc.policy.limits import BudgetAdmission, Refusal
from extproc.policy.secrets import SecretError, read_secret
from extproc.usage.store import MemoryStore, OnSync, RedisStore, Store

UNREAD = (
    "Client '{}' is new to this gateway replica and its limits are being read from the "
    "shared store; retry in a second."
)


class Limiter:
    """Checks and counts against a ``Store``; the request path only touches local state."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        # Checking the counts and adding to them are one step: server: grpcio decides on a
        # pool of threads, and two requests must not both take a client's last request of
        # the minute or its last slot in flight.
        self._admitting = threading.Lock()

    def admit(
        self,
        client: str,
        limit: Limit,
        on_store_error: StoreFailure,
        budgets: BudgetAdmission | None = None,
        teams: tuple[str, ...] = (),
    ) -> Refusal | None:
        """None to go on (and the request is counted), or why not.

        ``budgets`` (spend's, for ``client`` in ``teams``) are asked last, in the same step,
        so a request they refuse uses up no request of the minute and no slot in flight.
        A count the shared store has not read yet (the client's first request
        through this replica) reads as 0, and the client gets one request until it is read.
        """
        with self._admitting:
            now = self._clock()
            refusal = self._check(client, limit, on_store_error, now)
            if refusal is None and budgets is not None:
                refusal = budgets.admit(client, teams)
            if refusal is None:
                self._count(client, limit, now)
            return refusal

    def _check(
        self, client: str, limit: Limit, on_store_error: StoreFailure, now: float
    ) -> Refusal | None:
        store = self.store
        if not store.healthy and on_store_error is StoreFailure.CLOSED:
            message = "Limits cannot be checked right now; retry shortly."
            return Refusal(503, "store", 5, message)
        unread = False
        if limit.concurrent is not None:
            inflight = store.inflight(client)
            unread = inflight is None
            if (inflight or 0) >= limit.concurrent:
                message = f"Client '{client}' has {limit.concurrent} requests in flight, its limit."
                return Refusal(429, "concurrent", 1, message)
        rpm = limit.requests_per_minute
        if rpm is not None:
            requests, minute = f"{client}:requests:60", int(now // 60)
            count = store.get(requests, 60, minute)
            unread = unread or count is None
            if (count or 0) >= rpm:
                message = f"Client '{client}' reached its {rpm} requests per minute."
                wait = _seconds((minute + 1) * 60 - now)
                return Refusal(429, "requests_per_minute", wait, message)
        if limit.tokens is not None:
            seconds = limit.token_window_s
            window = int(now // seconds)
            count = store.get(f"{client}:tokens:{seconds}", seconds, window)
            unread = unread or count is None
            if (count or 0) >= limit.tokens:
                message = f"Client '{client}' used its {limit.tokens} tokens for this window."
                return Refusal(429, "tokens", _seconds((window + 1) * seconds - now), message)
        if unread and not store.unread_admit(client):
            return Refusal(429, "syncing", 1, UNREAD.format(client))
        return None

    def _count(self, client: str, limit: Limit, now: float) -> None:
        if limit.requests_per_minute is not None:
            self.store.incr(f"{client}:requests:60", 60, int(now // 60), 1)
        if limit.concurrent is not None:
            self.started(client)

    def charge(self, client: str, limit: Limit, tokens: int) -> None:
        """Count ``tokens`` a finished response used into the client's current window."""
        if tokens <= 0:
            return
        seconds = limit.token_window_s
        window = int(self._clock() // seconds)
        self.store.incr(f"{client}:tokens:{seconds}", seconds, window, tokens)

    def close(self) -> None:
        self.store.close()

    def started(self, client: str) -> None:
        """One more in flight: a lease that its usage record (``finished``) ends."""
        self.store.inflight_add(client, 1)

    def finished(self, client: str) -> None:
        self.store.inflight_add(client, -1)


def limiter_for(
    limits: Limits | None, environ: Mapping[str, str], on_sync: OnSync | None = None
) -> Limiter | None:
    """The limiter for ``limits``: counting in this process, or through a shared store.

    Without a shared store ``on_sync`` hears once that all is well: there is no
    store to lose, so ``gateway_limits_store_up`` reads 1, never an alarm.
    """
    if limits is None or not limits.shared:
        if on_sync is not None:
            on_sync(True, 0)
        return Limiter(MemoryStore()) if limits is not None else None
    secret = read_secret(limits.password, environ) if limits.password else None
    try:
        password = secret.reveal().decode() if secret else None
    except UnicodeDecodeError:  # its message would quote a byte of the password
        assert limits.password is not None
        raise SecretError(f"{limits.password.describe()} is not UTF-8 text") from None
    store = RedisStore(limits.store, password, limits.sync_ms / 1000, on_sync=on_sync)
    store.start()
    return Limiter(store)


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))
