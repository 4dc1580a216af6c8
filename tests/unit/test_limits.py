"""Limits per gateway client (issue 12): the YAML's meaning, the limiter's windows, the 429.

No Envoy, no Redis: the limiter counts in a ``MemoryStore`` and reads an
injected clock, so every window edge and retry-after is exact.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.keys import key_line
from harness.messages import headers_request

from extproc.config.limits import LIMITS, limit, limits
from extproc.config.load import load_config
from extproc.config.model import METADATA_NAMESPACE, Limit, Limits, SecretRef, StoreFailure
from extproc.config.sections import ConfigError, Problems, Section
from extproc.config.yamlsource import loads
from extproc.policy.compiled import Policy, compile_policy
from extproc.policy.decision import Outcome
from extproc.policy.limits import Refusal
from extproc.policy.processor import process
from extproc.policy.secrets import SecretError
from extproc.server.metrics import Metrics
from extproc.usage.limiter import Limiter, limiter_for
from extproc.usage.store import MemoryStore, RedisStore

OPEN, CLOSED = StoreFailure.OPEN, StoreFailure.CLOSED
HEAD = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - {name: r, prefix: /r, upstream: 'https://api.anthropic.com'}
"""


def limits_of(text: str, folder: Path) -> Limits | None:
    (folder / "gateway.yaml").write_text(HEAD + text)
    return load_config(folder / "gateway.yaml").limits


# -- what the YAML means ------------------------------------------------------------------

MERGED = """\
metering: true
limits:
  default: {requests_per_minute: 10, tokens: 1000, token_window: 1h, concurrent: 2}
  clients:
    alice: {tokens: 5000}
    bob: {requests_per_minute: null}
    carol: {}
    dave: {token_window: 1d, concurrent: null, tokens: 0}
    e.v_e-1@x: {concurrent: 7}
"""


def test_a_client_override_merges_over_the_default_field_by_field(tmp_path: Path) -> None:
    limits = limits_of(MERGED, tmp_path)
    assert limits is not None
    assert limits.default == Limit(10, 1000, 3600, 2)
    assert dict(limits.clients) == {
        "alice": Limit(10, 5000, 3600, 2),
        "bob": Limit(None, 1000, 3600, 2),  # null lifts the default's limit
        "carol": Limit(10, 1000, 3600, 2),
        "dave": Limit(10, 0, 86400, None),
        "e.v_e-1@x": Limit(10, 1000, 3600, 7),
    }


def test_without_a_default_overrides_merge_over_no_limits(tmp_path: Path) -> None:
    text = "metering: true\nlimits:\n  clients:\n    alice: {concurrent: 1}\n"
    limits = limits_of(text, tmp_path)
    assert limits == Limits(Limit(), (("alice", Limit(concurrent=1)),))


def test_the_defaults_of_a_limits_section(tmp_path: Path) -> None:
    limits = limits_of("limits: {}\n", tmp_path)
    assert limits == Limits(Limit(), (), "memory", None, OPEN, 200)
    assert not limits.shared
    assert limits_of("", tmp_path) is None


@pytest.mark.parametrize(
    ("window", "seconds"),
    [("1s", 1), ("45s", 45), ("1m", 60), ("30m", 1800), ("1h", 3600), ("12h", 43200),
     ("1d", 86400), ("7d", 604800), ("9999999s", 9999999)],
)  # fmt: skip
def test_token_window_units(window: str, seconds: int, tmp_path: Path) -> None:
    limits = limits_of(f"limits:\n  default: {{token_window: {window}}}\n", tmp_path)
    assert limits is not None and limits.default.token_window_s == seconds


def test_a_redis_store_with_a_password_reference_and_the_bounds_of_sync_ms(
    tmp_path: Path,
) -> None:
    text = (
        "extproc: {workers: 4}\nlimits:\n  store: rediss://cache.internal:6380/15\n"
        "  password: {env: REDIS_PASSWORD}\n  on_store_error: closed\n  sync_ms: 20\n"
    )
    limits = limits_of(text, tmp_path)
    assert limits is not None and limits.shared
    assert (limits.store, limits.password, limits.on_store_error, limits.sync_ms) == (
        "rediss://cache.internal:6380/15",
        SecretRef(env="REDIS_PASSWORD"),
        CLOSED,
        20,
    )
    limits = limits_of("limits: {store: 'redis://h', sync_ms: 10000}\n", tmp_path)
    assert limits is not None and (limits.store, limits.sync_ms) == ("redis://h", 10000)


@pytest.mark.parametrize(
    "text",
    [
        "extproc: {workers: 1}\nlimits: {store: memory}\n",
        "limits:\n  default: {requests_per_minute: 0}\n",  # requests need no metering
        "metering: true\nlimits:\n  default: {tokens: 1000000000000, concurrent: 0}\n",
        f"limits:\n  clients:\n    {'c' * 63}: {{requests_per_minute: 1}}\n",
    ],
    ids=["one worker, memory", "requests only", "edges of the range", "a 63-character name"],
)
def test_valid_limits(text: str, tmp_path: Path) -> None:
    assert limits_of(text, tmp_path) is not None


def test_a_64_character_client_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        limits_of(f"limits:\n  clients:\n    {'c' * 64}: {{}}\n", tmp_path)
    assert caught.value.problems == (
        f"gateway.yaml:5 limits.clients: {'c' * 64!r} is not a client name as in the keys file",
    )


def test_a_bad_password_reference_fails_even_with_a_redis_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        limits_of("limits:\n  store: redis://h\n  password: {env: 'no such'}\n", tmp_path)
    assert caught.value.problems == (
        "gateway.yaml:6 limits.password.env: expected an environment variable name "
        "(letters, digits, '_')",
    )


def test_a_password_from_a_file(tmp_path: Path) -> None:
    limits = limits_of("limits:\n  store: redis://h\n  password: {file: redis.pw}\n", tmp_path)
    assert limits is not None and limits.password == SecretRef(file=tmp_path / "redis.pw")
    with pytest.raises(ConfigError) as caught:
        limits_of("limits:\n  store: redis://h\n  password: {env: P, optional: true}\n", tmp_path)
    assert caught.value.problems == (
        "gateway.yaml:6 limits.password.optional: unknown field (allowed: env, file)",
    )


def parse_limits(text: str, password: SecretRef | None = None) -> tuple[Limits | None, list[str]]:
    """``limits()`` called as ``load`` calls it; ``password``: what the secret reference gave."""
    doc = loads(text, "gateway.yaml")
    found = Problems(doc)
    top = Section(found, (), doc.data, ["limits"])
    section = top.section("limits", LIMITS)

    def secret(reference: Section | None) -> SecretRef | None:
        if password is None and reference is not None:
            reference.error(None, "not a usable reference")  # as the real one reports
        return password

    return limits(section, found, secret, None, True), [str(p) for p in found.items]


@pytest.mark.parametrize(
    "text",
    [
        "limits:\n  default: {tokens: -1}\n",
        "limits:\n  default: 5\n",
        "limits:\n  default: {token_window: 1w}\n",
        "limits:\n  clients:\n    alice: {tokens: -1}\n",
        "limits:\n  clients:\n    alice: 5\n",
        "limits:\n  clients:\n    'a b': {}\n",
        "limits:\n  clients:\n    'a b': {}\n    alice: {}\n",
        "limits:\n  clients:\n    alice: {}\n    bob: {concurrent: x}\n    carol: {}\n",
        "limits:\n  clients: []\n",
        "limits:\n  store: redis://h\n  password: {env: 'not a name'}\n",
    ],
    ids=["bad default value", "default not a mapping", "bad default window", "bad client value",
         "client not a mapping", "bad client name", "bad name before a good client",
         "bad client between good ones", "clients not a mapping", "bad password reference"],
)  # fmt: skip
def test_limits_are_none_whenever_a_problem_is_reported(text: str) -> None:
    """The contract ``load`` relies on: a model only from a clean section."""
    parsed, found = parse_limits(text)
    assert found and parsed is None


def test_a_clean_section_gives_the_model_and_no_problem() -> None:
    text = "limits:\n  store: redis://h\n  password: {env: P}\n  clients:\n    a: {}\n    b: {}\n"
    parsed, found = parse_limits(text, password=SecretRef(env="P"))
    assert found == []
    assert parsed == Limits(Limit(), (("a", Limit()), ("b", Limit())), "redis://h", SecretRef("P"))


def test_a_limit_block_that_is_not_a_mapping_is_no_limit() -> None:
    doc = loads("default: 5\n", "gateway.yaml")
    found = Problems(doc)
    assert limit(Section(found, ("default",), 5, ["tokens"]), Limit(tokens=1)) is None
    assert [str(p) for p in found.items] == ["gateway.yaml:1 default: expected a mapping, got int"]


# -- the limiter ---------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class DownStore(MemoryStore):
    """A store whose shared side is unreachable: it counts in this process only."""

    @property
    def healthy(self) -> bool:
        return False


def limiter(now: float = 0.0, store: MemoryStore | None = None) -> tuple[Limiter, Clock]:
    clock = Clock(now)
    return Limiter(store or MemoryStore(clock), clock), clock


def memory(lim: Limiter) -> MemoryStore:
    assert isinstance(lim.store, MemoryStore)
    return lim.store


def counted(lim: Limiter, key: str) -> int:
    """What the limiter's memory store holds under ``key`` (series:index)."""
    return memory(lim)._counts.get(key, 0)


RPM = "Client 'alice' reached its {} requests per minute."
TOKENS = "Client 'alice' used its {} tokens for this window."
CONCURRENT = "Client 'alice' has {} requests in flight, its limit."
STORE = "Limits cannot be checked right now; retry shortly."


@pytest.mark.parametrize(
    ("limit", "admitted", "refusal"),
    [
        (Limit(requests_per_minute=3), 3, Refusal(429, "requests_per_minute", 50, RPM.format(3))),
        (Limit(requests_per_minute=1), 1, Refusal(429, "requests_per_minute", 50, RPM.format(1))),
        (Limit(requests_per_minute=0), 0, Refusal(429, "requests_per_minute", 50, RPM.format(0))),
        (Limit(concurrent=2), 2, Refusal(429, "concurrent", 1, CONCURRENT.format(2))),
        (Limit(concurrent=0), 0, Refusal(429, "concurrent", 1, CONCURRENT.format(0))),
        (Limit(tokens=0, token_window_s=3600), 0, Refusal(429, "tokens", 3590, TOKENS.format(0))),
    ],
    ids=["3 rpm", "1 rpm", "0 rpm", "2 concurrent", "0 concurrent", "0 tokens"],
)
def test_each_limit_admits_up_to_its_value_then_refuses(
    limit: Limit, admitted: int, refusal: Refusal
) -> None:
    """Each admitted request is counted in flight and never finishes in this test."""
    lim, _ = limiter(now=10.0)
    for _ in range(admitted):
        assert lim.admit("alice", limit, OPEN) is None
    assert lim.admit("alice", limit, OPEN) == refusal
    assert lim.admit("alice", limit, OPEN) == refusal  # and stays refused
    assert lim.admit("bob", limit, OPEN) == (None if admitted else refusal._replace(
        message=refusal.message.replace("alice", "bob")))  # fmt: skip


def test_a_token_limit_refuses_once_the_charged_tokens_reach_it() -> None:
    lim, clock = limiter(now=100.0)
    limit = Limit(tokens=1000, token_window_s=3600)
    lim.charge("alice", limit, 999)
    assert lim.admit("alice", limit, OPEN) is None
    lim.charge("alice", limit, 1)
    assert lim.admit("alice", limit, OPEN) == Refusal(429, "tokens", 3500, TOKENS.format(1000))
    clock.now = 3600.0  # the next window
    assert lim.admit("alice", limit, OPEN) is None


def test_a_request_may_overshoot_the_token_limit_it_was_admitted_under() -> None:
    lim, _ = limiter()
    limit = Limit(tokens=10, token_window_s=60)
    assert lim.admit("alice", limit, OPEN) is None
    lim.charge("alice", limit, 500)
    assert counted(lim, "alice:tokens:60:0") == 500


@pytest.mark.parametrize(("tokens", "expected"), [(0, 0), (-5, 0), (1, 1)])
def test_nothing_or_less_is_never_charged(tokens: int, expected: int) -> None:
    lim, _ = limiter()
    lim.charge("alice", Limit(tokens=1, token_window_s=60), tokens)
    assert counted(lim, "alice:tokens:60:0") == expected
    assert len(memory(lim)._counts) == expected  # no key made for nothing


@pytest.mark.parametrize(
    ("now", "retry_after"),
    [
        (0.0, 60), (0.5, 60), (1.0, 59), (15.2, 45), (59.0, 1), (59.5, 1), (59.999, 1),
        (120.0, 60), (179.2, 1), (1_700_000_011.7, 29),
    ],
)  # fmt: skip
def test_retry_after_is_the_seconds_to_the_end_of_the_minute_rounded_up(
    now: float, retry_after: int
) -> None:
    lim, _ = limiter(now)
    assert lim.admit("alice", Limit(requests_per_minute=0), OPEN) == Refusal(
        429, "requests_per_minute", retry_after, RPM.format(0)
    )


@pytest.mark.parametrize(
    ("window", "now", "retry_after"),
    [
        (86400, 0.0, 86400), (86400, 86400 * 3 + 100.0, 86300), (86400, 86399.5, 1),
        (3600, 7199.0, 1), (3600, 7200.0, 3600), (90, 100.0, 80), (1, 5.25, 1),
    ],
)  # fmt: skip
def test_token_windows_are_aligned_to_the_epoch(window: int, now: float, retry_after: int) -> None:
    lim, _ = limiter(now)
    refusal = lim.admit("alice", Limit(tokens=0, token_window_s=window), OPEN)
    assert refusal == Refusal(429, "tokens", retry_after, TOKENS.format(0))


def test_the_request_window_starts_again_on_the_minute() -> None:
    lim, clock = limiter(now=59.0)
    limit = Limit(requests_per_minute=1)
    assert lim.admit("alice", limit, OPEN) is None
    assert lim.admit("alice", limit, OPEN) is not None
    clock.now = 60.0
    assert lim.admit("alice", limit, OPEN) is None
    assert lim.admit("alice", limit, OPEN) is not None


# Every limit exceeded at once: the first check that fails names the refusal.
ORDER = [
    ("store down and closed first", False, CLOSED, Refusal(503, "store", 5, STORE)),
    ("then concurrency", True, CLOSED, Refusal(429, "concurrent", 1, CONCURRENT.format(1))),
    ("store down but open: concurrency", False, OPEN,
     Refusal(429, "concurrent", 1, CONCURRENT.format(1))),
]  # fmt: skip


@pytest.mark.parametrize(
    ("healthy", "failure", "refusal"), [c[1:] for c in ORDER], ids=[c[0] for c in ORDER]
)
def test_the_order_of_checks(healthy: bool, failure: StoreFailure, refusal: Refusal) -> None:
    clock = Clock(30.0)
    lim = Limiter(MemoryStore(clock) if healthy else DownStore(clock), clock)
    everything = Limit(requests_per_minute=1, tokens=1, token_window_s=60, concurrent=1)
    assert lim.admit("alice", everything, OPEN) is None
    lim.charge("alice", everything, 1)
    assert lim.admit("alice", everything, failure) == refusal


def test_requests_are_checked_before_tokens() -> None:
    lim, _ = limiter(30.0)
    limit = Limit(requests_per_minute=1, tokens=1, token_window_s=3600)
    assert lim.admit("alice", limit, OPEN) is None
    lim.charge("alice", limit, 1)
    assert lim.admit("alice", limit, OPEN) == Refusal(429, "requests_per_minute", 30, RPM.format(1))
    assert lim.admit("alice", Limit(tokens=1, token_window_s=3600), OPEN) == Refusal(
        429, "tokens", 3570, TOKENS.format(1)
    )


@pytest.mark.parametrize(
    "refused_by",
    [Limit(requests_per_minute=5, concurrent=0), Limit(requests_per_minute=5, tokens=0)],
    ids=["concurrency", "tokens"],
)
def test_a_refused_request_is_not_counted(refused_by: Limit) -> None:
    lim, _ = limiter(30.0)
    for _ in range(10):
        assert lim.admit("alice", refused_by, OPEN) is not None
    assert counted(lim, "alice:requests:60:0") == 0
    rpm_only = Limit(requests_per_minute=1)
    assert lim.admit("alice", rpm_only, OPEN) is None
    assert lim.admit("alice", rpm_only, OPEN) is not None


def test_a_refusal_by_the_request_limit_is_not_counted_either() -> None:
    lim, _ = limiter(30.0)
    limit = Limit(requests_per_minute=2)
    for _ in range(5):
        lim.admit("alice", limit, OPEN)
    assert counted(lim, "alice:requests:60:0") == 2


def test_admitted_requests_are_counted_only_with_a_request_limit() -> None:
    lim, _ = limiter(30.0)
    assert lim.admit("alice", Limit(tokens=5, token_window_s=60, concurrent=3), OPEN) is None
    assert counted(lim, "alice:requests:60:0") == 0
    assert memory(lim)._counts == {}


def test_tokens_land_in_the_window_of_the_charge_time() -> None:
    """A response that started in one window and ended in the next counts in the next."""
    lim, clock = limiter(now=50.0)
    limit = Limit(tokens=10, token_window_s=60)
    assert lim.admit("alice", limit, OPEN) is None
    clock.now = 70.0
    lim.charge("alice", limit, 10)
    assert counted(lim, "alice:tokens:60:0") == 0
    assert counted(lim, "alice:tokens:60:1") == 10
    assert lim.admit("alice", limit, OPEN) == Refusal(429, "tokens", 50, TOKENS.format(10))
    clock.now = 50.0
    assert lim.admit("alice", limit, OPEN) is None


def test_windows_of_other_clients_and_lengths_are_apart() -> None:
    lim, _ = limiter(now=30.0)
    lim.charge("alice", Limit(token_window_s=60), 7)
    lim.charge("alice", Limit(token_window_s=3600), 9)
    lim.charge("bob", Limit(token_window_s=60), 11)
    assert memory(lim)._counts == {
        "alice:tokens:60:0": 7,
        "alice:tokens:3600:0": 9,
        "bob:tokens:60:0": 11,
    }


@pytest.mark.parametrize(
    ("kind", "now", "expiry"),
    [("requests", 30.0, 120.0), ("requests", 130.0, 240.0), ("tokens", 30.0, 3660.0),
     ("tokens", 3600.0, 7260.0)],
)  # fmt: skip
def test_a_window_is_kept_a_minute_past_its_end(kind: str, now: float, expiry: float) -> None:
    """So a replica whose clock is a little behind still reads the window it counts into."""
    lim, _ = limiter(now)
    limit = Limit(requests_per_minute=5, tokens=5, token_window_s=3600)
    if kind == "requests":
        lim.admit("alice", limit, OPEN)
    else:
        lim.charge("alice", limit, 3)
    assert list(memory(lim)._expiry.values()) == [expiry]


def test_requests_in_flight_go_up_and_down_and_never_below_zero() -> None:
    lim, _ = limiter()
    limit = Limit(concurrent=2)
    lim.finished("alice")  # a stream that ends without having started
    assert lim.store.inflight("alice") == 0
    lim.started("alice")
    lim.started("alice")
    assert lim.store.inflight("alice") == 2
    assert lim.admit("alice", limit, OPEN) is not None
    lim.finished("alice")
    assert lim.store.inflight("alice") == 1
    assert lim.admit("alice", limit, OPEN) is None
    for _ in range(3):
        lim.finished("alice")
    assert lim.store.inflight("alice") == 0
    lim.started("alice")
    assert lim.store.inflight("alice") == 1  # not 1 minus the extra finishes
    assert lim.store.inflight("bob") == 0


def test_store_down_and_closed_refuses_with_503_and_counts_nothing() -> None:
    clock = Clock(30.0)
    lim = Limiter(DownStore(clock), clock)
    for each in (Limit(requests_per_minute=100), Limit(tokens=10**6), Limit(concurrent=100)):
        assert lim.admit("alice", each, CLOSED) == Refusal(503, "store", 5, STORE)
    assert counted(lim, "alice:requests:60:0") == 0


def test_store_down_and_open_counts_in_this_process() -> None:
    clock = Clock(30.0)
    lim = Limiter(DownStore(clock), clock)
    limit = Limit(requests_per_minute=2)
    assert lim.admit("alice", limit, OPEN) is None
    assert lim.admit("alice", limit, OPEN) is None
    assert lim.admit("alice", limit, OPEN) == Refusal(429, "requests_per_minute", 30, RPM.format(2))
    assert counted(lim, "alice:requests:60:0") == 2


def test_a_healthy_store_never_refuses_with_503() -> None:
    lim, _ = limiter(30.0)
    assert lim.admit("alice", Limit(requests_per_minute=1), CLOSED) is None


def test_the_limiter_reads_the_wall_clock_by_default() -> None:
    import time

    lim = Limiter(MemoryStore())
    before = int(time.time() // 60)
    lim.admit("alice", Limit(requests_per_minute=5), OPEN)
    [key] = memory(lim)._counts
    assert key in {f"alice:requests:60:{before}", f"alice:requests:60:{before + 1}"}


# -- building the limiter ------------------------------------------------------------------


def test_no_limits_no_limiter_and_memory_limits_count_in_this_process() -> None:
    assert limiter_for(None, {}) is None
    lim = limiter_for(Limits(), {})
    assert lim is not None and type(lim.store) is MemoryStore
    lim.close()  # nothing to stop


@pytest.mark.parametrize("limits", [None, Limits()], ids=["no limits", "store: memory"])
def test_without_a_shared_store_the_store_reads_up(limits: Limits | None) -> None:
    """Nothing shared to lose: ``gateway_limits_store_up`` is 1, so an alert on 0 never fires
    on a healthy gateway (on 7fe3c72 nothing reported it and it read 0)."""
    metrics = Metrics()
    limiter_for(limits, {}, metrics.store_synced)
    assert metrics.registry.get_sample_value("gateway_limits_store_up") == 1
    assert metrics.registry.get_sample_value("gateway_limits_sync_failures_total") == 0


def test_a_shared_store_gets_its_url_password_and_sync_interval() -> None:
    def on_sync(ok: bool, lost: int) -> None: ...

    limits = Limits(store="redis://127.0.0.1:9/3", password=SecretRef(env="P"), sync_ms=4000)
    lim = limiter_for(limits, {"P": "pass-word"}, on_sync)
    assert lim is not None
    try:
        store = lim.store
        assert isinstance(store, RedisStore)
        kwargs = store._redis.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 9, 3)
        assert kwargs["password"] == "pass-word"
        assert store._sync_s == 4.0
        assert store._on_sync is on_sync
    finally:
        lim.close()
    assert not store._thread.is_alive()


def test_a_password_that_is_not_utf8_is_a_secret_error_quoting_no_byte(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"\xff\xfesecret")
    limits = Limits(store="redis://127.0.0.1:9", password=SecretRef(file=tmp_path / "pw"))
    with pytest.raises(SecretError) as caught:
        limiter_for(limits, {})
    assert "is not UTF-8 text" in str(caught.value) and "0xff" not in str(caught.value)


def test_a_shared_store_without_a_password() -> None:
    lim = limiter_for(Limits(store="redis://127.0.0.1:9", sync_ms=10000), {})
    assert lim is not None and isinstance(lim.store, RedisStore)
    lim.close()
    assert lim.store._redis.connection_pool.connection_kwargs.get("password") is None
    assert not lim.store._thread.is_alive()


# -- the processor asks the limiter ---------------------------------------------------------

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
metering: true
access: {keys_file: keys.txt}
limits:
  default: {requests_per_minute: 1}
  clients:
    free: {requests_per_minute: null}
routes:
  - name: anthropic
    prefix: /anthropic
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: openai
    prefix: /openai
    upstream: https://api.openai.com/v1
    error_style: openai
    credential: {header: authorization, format: "Bearer {secret}", secret: {env: SERVER}}
  - name: strict
    prefix: /strict
    upstream: https://api.anthropic.com
    access: {keys_file: keys.txt, for_client_credentials: true}
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: replace
    prefix: /replace
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}, mode: replace_client}
  - name: open
    prefix: /open
    upstream: https://api.anthropic.com
    access: false
    credential: {header: x-api-key, secret: {env: SERVER}}
"""


class Recorder:
    """An admission that records what it is asked and answers ``refusal``."""

    def __init__(self, refusal: Refusal | None) -> None:
        self.refusal = refusal
        self.asked: list[tuple[str, Limit, StoreFailure]] = []

    def admit(
        self, client: str, limit: Limit, on_store_error: StoreFailure, *budgets: object
    ) -> Refusal | None:  # (no budgets in these tests)
        self.asked.append((client, limit, on_store_error))
        return self.refusal


@pytest.fixture
def gateway(tmp_path: Path) -> tuple[Policy, dict[str, str]]:
    keys = [key_line("alice", "gk-alice"), key_line("free", "gk-free")]
    (tmp_path / "keys.txt").write_text("".join(line + "\n" for line in keys))
    (tmp_path / "gateway.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "gateway.yaml")
    names = {route.name: route.envoy_name for route in config.routes}
    return compile_policy(config, {"SERVER": "sk-server"}), names


def limited(payload: bytes) -> tuple[pb.ImmediateResponse, dict[str, str], dict[str, object]]:
    answer = pb.ProcessingResponse.FromString(payload)
    assert answer.WhichOneof("response") == "immediate_response"
    meta = answer.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    fields = {key: value.string_value for key, value in meta.items()}
    immediate = answer.immediate_response
    return immediate, fields, json.loads(immediate.body)


GK = ("x-api-key", b"gk-alice")
REFUSALS = [
    ("429 in Anthropic's shape", "anthropic", [GK], Refusal(429, "tokens", 3599, "over"),
     {"type": "error", "error": {"type": "rate_limit_error", "message": "over"}}),
    ("503 in Anthropic's shape", "anthropic", [GK], Refusal(503, "store", 5, "down"),
     {"type": "error", "error": {"type": "overloaded_error", "message": "down"}}),
    ("429 in OpenAI's shape", "openai", [("authorization", b"Bearer gk-alice")],
     Refusal(429, "requests_per_minute", 17, "too many"),
     {"error": {"message": "too many", "type": "requests", "param": None,
                "code": "rate_limit_exceeded"}}),
    ("503 in OpenAI's shape", "openai", [("authorization", b"Bearer gk-alice")],
     Refusal(503, "store", 5, "down"),
     {"error": {"message": "down", "type": "server_error", "param": None,
                "code": "service_unavailable"}}),
    ("a replaced credential spends the key too", "replace",
     [("x-api-key", b"sk-own"), ("x-gateway-key", b"gk-alice")],
     Refusal(429, "concurrent", 1, "busy"),
     {"type": "error", "error": {"type": "rate_limit_error", "message": "busy"}}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "headers", "refusal", "body"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_a_refusal_is_answered_by_the_gateway_in_the_providers_shape(
    gateway: tuple[Policy, dict[str, str]],
    route: str,
    headers: list[tuple[str, bytes]],
    refusal: Refusal,
    body: object,
) -> None:
    policy, names = gateway
    admission = Recorder(refusal)
    answer = process(policy, headers_request(names[route], headers), admission)
    assert (answer.route, answer.outcome, answer.client) == (route, Outcome.LIMITED, "alice")
    assert admission.asked == [("alice", Limit(requests_per_minute=1), OPEN)]
    immediate, meta, parsed = limited(answer.payload)
    assert immediate.status.code == refusal.status
    assert [(h.header.key, h.header.raw_value) for h in immediate.headers.set_headers] == [
        ("retry-after", str(refusal.retry_after).encode())
    ]
    assert parsed == body
    assert immediate.details == f"credential_gateway_limited_{refusal.limit}"
    assert meta == {
        "route": route,
        "credential_source": "none",
        "outcome": "limited",
        "client": "alice",
    }


@pytest.mark.parametrize(
    ("route", "headers", "outcome", "client"),
    [
        ("strict", [("x-api-key", b"sk-own"), ("x-gateway-key", b"gk-alice")],
         Outcome.CLIENT_API_KEY, "alice"),
        ("strict", [("authorization", b"Bearer sk-ant-oat01-x"), ("x-gateway-key", b"gk-alice")],
         Outcome.CLIENT_AUTHORIZATION, "alice"),
        ("anthropic", [("x-api-key", b"sk-own")], Outcome.CLIENT_API_KEY, ""),
        ("open", [], Outcome.INJECTED, ""),  # spends the key, but names no client
        ("anthropic", [("x-api-key", b"gk-wrong")], Outcome.DENIED, ""),
        ("anthropic", [("x-api-key", b"gk-free")], Outcome.INJECTED, "free"),  # no limit left
    ],
    ids=["own key", "own OAuth token", "own key, no gateway key", "no client", "denied",
         "a client whose override lifts every limit"],
)  # fmt: skip
def test_requests_that_do_not_spend_the_key_of_a_limited_client_never_reach_admission(
    gateway: tuple[Policy, dict[str, str]],
    route: str,
    headers: list[tuple[str, bytes]],
    outcome: Outcome,
    client: str,
) -> None:
    policy, names = gateway
    admission = Recorder(Refusal(429, "requests_per_minute", 1, "no"))
    answer = process(policy, headers_request(names[route], headers), admission)
    assert (answer.outcome, answer.client) == (outcome, client)
    assert admission.asked == []


def test_an_admitted_request_gets_the_usual_answer(gateway: tuple[Policy, dict[str, str]]) -> None:
    policy, names = gateway
    admission = Recorder(None)
    request = headers_request(names["anthropic"], [GK])
    answer = process(policy, request, admission)
    assert (answer.outcome, answer.client) == (Outcome.INJECTED, "alice")
    assert answer.payload == process(policy, request).payload  # as without limits
    assert len(admission.asked) == 1


def test_a_policy_without_limits_never_asks(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text(key_line("alice", "gk-alice") + "\n")
    without = CONFIG.split("limits:", 1)[0] + "routes:" + CONFIG.split("routes:", 1)[1]
    (tmp_path / "gateway.yaml").write_text(without)
    config = load_config(tmp_path / "gateway.yaml")
    policy = compile_policy(config, {"SERVER": "sk-server"})
    admission = Recorder(Refusal(429, "requests_per_minute", 1, "no"))
    route = next(r.envoy_name for r in config.routes if r.name == "anthropic")
    answer = process(policy, headers_request(route, [GK]), admission)
    assert (answer.outcome, admission.asked) == (Outcome.INJECTED, [])


def test_with_a_real_limiter_the_second_request_of_the_minute_is_refused(
    gateway: tuple[Policy, dict[str, str]],
) -> None:
    policy, names = gateway
    lim, _ = limiter(now=45.0)
    request = headers_request(names["anthropic"], [GK])
    assert process(policy, request, lim).outcome is Outcome.INJECTED
    answer = process(policy, request, lim)
    assert answer.outcome is Outcome.LIMITED
    immediate, _, parsed = limited(answer.payload)
    assert immediate.headers.set_headers[0].header.raw_value == b"15"
    assert parsed["error"]["message"] == "Client 'alice' reached its 1 requests per minute."
    free = headers_request(names["anthropic"], [("x-api-key", b"gk-free")])
    assert [process(policy, free, lim).outcome for _ in range(3)] == [Outcome.INJECTED] * 3


class _SlowRead(MemoryStore):
    """A store whose first read, once done, waits (up to a second) for a second reader."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = threading.Event(), threading.Event()

    def get(self, series: str, seconds: int, index: int) -> int:
        count = super().get(series, seconds, index)
        if not self.first.is_set():
            self.first.set()
            self.second.wait(timeout=1)  # a fixed limiter: the second waits for this one
        else:
            self.second.set()
        return count


def test_two_threads_admitting_at_once_never_pass_requests_per_minute() -> None:
    # server: grpcio decides on a pool of threads: a check and its count are one step.
    limiter = Limiter(_SlowRead())
    limit = Limit(requests_per_minute=1)
    answers: list[Refusal | None] = []

    def admit() -> None:
        answers.append(limiter.admit("alice", limit, StoreFailure.OPEN))

    threads = [threading.Thread(target=admit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 2
    assert [a is None for a in answers].count(True) == 1
