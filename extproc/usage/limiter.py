"""Limits per gateway client on the organisation's key, checked when a request starts.

Only requests that would spend the server's credential are checked (the
processor calls ``admit`` only for those); a client-paid request never is.
Windows are fixed and aligned to the epoch (a minute for requests, the
configured window for tokens), so every replica counts into the same keys.
Token limits compare what has been counted so far: a request in flight is
charged when its response ends, so a client may overshoot by what its
requests in flight go on to use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from extproc.config.model import Limit, Limits, StoreFailure
from extproc.policy.limits import Refusal
from extproc.policy.secrets import read_secret
from extproc.usage.store import MemoryStore, RedisStore, Store


class Limiter:
    """Checks and counts against a ``Store``; the request path only touches local state."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    def admit(self, client: str, limit: Limit, on_store_error: StoreFailure) -> Refusal | None:
        """None to go on (and the request is counted), or why not."""
        if not self.store.healthy and on_store_error is StoreFailure.CLOSED:
            message = "Limits cannot be checked right now; retry shortly."
            return Refusal(503, "store", 5, message)
        now = self._clock()
        if limit.concurrent is not None and self.store.inflight(client) >= limit.concurrent:
            message = f"Client '{client}' has {limit.concurrent} requests in flight, its limit."
            return Refusal(429, "concurrent", 1, message)
        rpm = limit.requests_per_minute
        if rpm is not None:
            requests, minute_ends = _window(client, "requests", 60, now)
            if self.store.get(requests) >= rpm:
                message = f"Client '{client}' reached its {rpm} requests per minute."
                return Refusal(429, "requests_per_minute", _seconds(minute_ends - now), message)
        if limit.tokens is not None:
            key, resets = _window(client, "tokens", limit.token_window_s, now)
            if self.store.get(key) >= limit.tokens:
                message = f"Client '{client}' used its {limit.tokens} tokens for this window."
                return Refusal(429, "tokens", _seconds(resets - now), message)
        if rpm is not None:
            self.store.incr(requests, 1, minute_ends + 60)
        return None

    def charge(self, client: str, limit: Limit, tokens: int) -> None:
        """Count ``tokens`` a finished response used into the client's current window."""
        if tokens <= 0:
            return
        key, resets = _window(client, "tokens", limit.token_window_s, self._clock())
        self.store.incr(key, tokens, resets + 60)

    def close(self) -> None:
        self.store.close()

    def started(self, client: str) -> None:
        self.store.inflight_add(client, 1)

    def finished(self, client: str) -> None:
        self.store.inflight_add(client, -1)


def limiter_for(
    limits: Limits | None,
    environ: Mapping[str, str],
    on_sync: Callable[[bool, int], None] | None = None,
) -> Limiter | None:
    """The limiter for ``limits``: counting in this process, or through a shared store."""
    if limits is None:
        return None
    if not limits.shared:
        return Limiter(MemoryStore())
    secret = read_secret(limits.password, environ) if limits.password else None
    password = secret.reveal() if secret else None
    return Limiter(RedisStore(limits.store, password, limits.sync_ms / 1000, on_sync=on_sync))


def _window(client: str, kind: str, seconds: int, now: float) -> tuple[str, float]:
    """The key of the fixed window holding ``now``, and when it ends."""
    index = int(now // seconds)
    return f"{client}:{kind}:{seconds}:{index}", (index + 1) * seconds


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))
