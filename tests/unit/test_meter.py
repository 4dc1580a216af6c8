"""Usage records from Envoy's gRPC access log: entries in, records to metrics, limits, sinks.

The entries are built as Envoy's HTTP gRPC access logger sends them: the route Envoy
matched, the decision's dynamic metadata under ``credential_gateway``, the Lua meter's
under ``credential_gateway.usage``, the status, times and the session header.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from google.protobuf import json_format
from harness.keys import key_line
from harness.messages import headers_request

from extproc.config.load import load_config
from extproc.config.model import METADATA_NAMESPACE, Limit
from extproc.policy import responses
from extproc.policy.access import KeyLine, key_digest
from extproc.policy.compiled import Policy, compile_policy
from extproc.policy.decision import Outcome
from extproc.policy.processor import process
from extproc.server.metrics import OTHER_CLIENTS, Metrics
from extproc.usage.meter import Meter
from extproc.usage.record import UsageRecord
from extproc.usage.records import ROUTE_SOURCE_TAG, USAGE_NAMESPACE, UnreadableEntry, record

CLAUDE = "claude-sonnet-4-5-20250929"
CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
metering: true
access: {keys_file: keys.txt}
limits:
  default: {tokens: 1000, token_window: 1h, concurrent: 4}
  clients:
    chatty: {tokens: null}
    many: {concurrent: null}
routes:
  - name: anthropic
    prefix: /anthropic
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
"""
USAGE = {"model": CLAUDE, "input": 12, "output": 30, "cache_read": 100, "cache_5m": 4,
         "cache_1h": 6, "partial": False}  # fmt: skip


@pytest.fixture
def world(tmp_path: Path) -> tuple[Policy, str]:
    (tmp_path / "keys.txt").write_text(key_line("alice", "gk-alice") + "\n")
    (tmp_path / "gateway.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "gateway.yaml")
    return compile_policy(config, {"SERVER": "sk-server"}), config.routes[0].envoy_name


def entry(
    route: str,
    decision: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
    route_source: str = "client",
    **headers: str,
) -> log_pb.HTTPAccessLogEntry:
    """Without a decision, by default a fast-path copy's entry: its route says ``client``."""
    found = log_pb.HTTPAccessLogEntry()
    common = found.common_properties
    common.route_name = route
    if decision is None and route_source:
        common.custom_tags[ROUTE_SOURCE_TAG] = route_source
    common.start_time.seconds, common.start_time.nanos = 1_760_000_000, 500_000_000
    common.duration.seconds, common.duration.nanos = 2, 345_000_000
    if decision is not None:
        common.metadata.filter_metadata[METADATA_NAMESPACE].update(decision)
    if usage is not None:
        common.metadata.filter_metadata[USAGE_NAMESPACE].update(usage)
    found.request.request_id = "req-1"
    for name, value in headers.items():
        found.request.request_headers[name] = value
    found.response.response_code.value = 200
    return found


def batch(*entries: log_pb.HTTPAccessLogEntry) -> bytes:
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)
    return message.SerializeToString()


def paid(client: str = "alice") -> dict[str, str]:
    return {"credential_source": "injected", "outcome": "injected", "client": client}


class Charges:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def finished(self, client: str) -> None:
        self.calls.append(("finished", client))

    def charge(self, client: str, limit: Limit, tokens: int) -> None:
        self.calls.append(("charge", client, tokens))


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[UsageRecord]] = []
        self.fail = fail

    def records(self, found: Sequence[UsageRecord]) -> None:
        self.batches.append(list(found))
        if self.fail:
            raise RuntimeError("a sink's bug")


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_an_entry_becomes_a_record_of_everything_the_contract_names(
    world: tuple[Policy, str],
) -> None:
    policy, route = world
    found = record(policy, entry(route, paid(), USAGE, **{"x-claude-code-session-id": "s-1"}))
    assert found == UsageRecord(
        time=1_760_000_000.5, request_id="req-1", route="anthropic", client="alice", teams=(),
        credential_source="injected", model=CLAUDE, status=200, duration_ms=2345,
        session_id="s-1", input=12, output=30, cache_read=100, cache_creation_5m=4,
        cache_creation_1h=6, complete=True,
    )  # fmt: skip
    assert found.charged and found.total_tokens == 152


def test_on_the_fast_path_the_client_paid_and_without_usage_nothing_is_known(
    world: tuple[Policy, str],
) -> None:
    policy, route = world
    found = record(policy, entry(route))
    assert found is not None
    assert (found.credential_source, found.client, found.model, found.known) == (
        "client",
        "",
        "",
        False,
    )
    assert found.session_id == "" and found.complete


def test_without_a_decision_off_the_fast_path_nobody_is_known_to_have_paid(
    world: tuple[Policy, str],
) -> None:
    """The processor failed or timed out (or Envoy refused first): no credential is known to
    have gone upstream; a tag that is no source at all counts the same."""
    policy, route = world
    for tag in ("", "someone"):
        found = record(policy, entry(route, route_source=tag))
        assert found is not None and found.credential_source == "none"


def test_a_cut_stream_is_incomplete_and_keeps_what_was_reported(
    world: tuple[Policy, str],
) -> None:
    policy, route = world
    found = record(policy, entry(route, paid(), {"input": 12, "output": 1, "partial": True}))
    assert found is not None and not found.complete and (found.input, found.output) == (12, 1)


def test_a_request_on_no_route_of_the_policy_is_no_record(world: tuple[Policy, str]) -> None:
    policy, _route = world
    assert record(policy, entry("not_found")) is None


@pytest.mark.parametrize(
    "usage",
    [{"input": "12"}, {"output": -1}, {"input": 1.5}, {"cache_read": 2.0**60}, {"model": 5}],
)
def test_a_field_of_the_wrong_kind_makes_the_entry_unreadable(
    world: tuple[Policy, str], usage: dict[str, Any]
) -> None:
    policy, route = world
    with pytest.raises(UnreadableEntry):
        record(policy, entry(route, paid(), usage))


def test_an_over_long_or_unprintable_session_or_model_is_dropped(
    world: tuple[Policy, str],
) -> None:
    policy, route = world
    found = record(policy, entry(route, None, {"model": "x" * 200},
                                 **{"x-claude-code-session-id": "a b"}))  # fmt: skip
    assert found is not None and (found.model, found.session_id) == ("", "")


def test_a_batch_feeds_the_metrics_the_limits_and_every_sink(world: tuple[Policy, str]) -> None:
    policy, route = world
    metrics, charges, sinks = Metrics(), Charges(), [Sink(fail=True), Sink()]
    Meter(metrics, charges, sinks).batch(
        policy,
        batch(entry(route, paid(), USAGE), entry(route, None, USAGE), entry(route, paid("many"))),
    )
    # alice has only the default limits: her series is the shared one (bounded labels).
    labels = {"route": "anthropic", "client": OTHER_CLIENTS, "credential_source": "injected",
              "model": CLAUDE}  # fmt: skip
    assert sample(metrics, "gateway_usage_requests_total", **labels, tokens="known") == 1
    assert sample(metrics, "gateway_usage_tokens_total", **labels, type="cache_creation") == 10
    assert sample(metrics, "gateway_usage_tokens_total", route="anthropic", client="",
                  credential_source="client", model=CLAUDE, type="output") == 30  # fmt: skip
    # alice: in flight ends and tokens are charged; the client's own key is never charged;
    # "many" has no concurrency limit, so its end is not counted (nor was its start).
    assert charges.calls == [("finished", "alice"), ("charge", "alice", 152), ("charge", "many", 0)]
    assert [len(s.batches[0]) for s in sinks] == [3, 3]  # the failing sink cost the other nothing


def test_unreadable_entries_and_meter_errors_are_counted_never_raised(
    world: tuple[Policy, str],
) -> None:
    policy, route = world
    metrics = Metrics()
    usage = Meter(metrics, None)
    usage.batch(policy, b"\xff\xff not a message")
    usage.batch(
        policy, batch(entry(route, paid(), {"input": "x"}), entry(route, None, {"error": True}))
    )
    assert sample(metrics, "gateway_usage_records_unreadable_total") == 2
    assert sample(metrics, "gateway_usage_meter_errors_total") == 1
    assert sample(metrics, "gateway_usage_requests_total", route="anthropic", client="",
                  credential_source="client", model="unknown", tokens="unknown") == 1  # fmt: skip


def test_the_decisions_teams_reach_the_record(world: tuple[Policy, str], tmp_path: Path) -> None:
    """The processor writes the client's teams (a list) beside its name; the record has them."""
    policy, route = world
    line = KeyLine("bob", key_digest("gk-bob"), teams=("ml", "platform"))
    (tmp_path / "keys.txt").write_text(line.text() + "\n")
    teamed = compile_policy(load_config(tmp_path / "gateway.yaml"), {"SERVER": "sk-server"})
    answer = process(teamed, headers_request(route, (("x-api-key", b"gk-bob"),)))
    decision = ext_proc.ProcessingResponse.FromString(answer.payload).dynamic_metadata
    written = json_format.MessageToDict(decision)[METADATA_NAMESPACE]
    assert (written["client"], written["teams"]) == ("bob", ["ml", "platform"])
    found = record(teamed, entry(route, written, USAGE))
    assert found is not None and (found.client, found.teams) == ("bob", ("ml", "platform"))
    found = record(policy, entry(route, {**paid(), "teams": ["ml", "platform"]}, USAGE))
    assert found is not None and found.teams == ("ml", "platform")
    assert record(policy, entry(route, paid(), USAGE)).teams == ()  # type: ignore[union-attr]
    for wrong in ("ml", ["ml", 5]):
        with pytest.raises(UnreadableEntry):
            record(policy, entry(route, {**paid(), "teams": wrong}))


def test_appended_teams_are_exactly_protobufs_own_encoding() -> None:
    """Lengths around 127/128 at every nesting level: a varint off by one shows here."""
    for size in range(1, 200, 7):
        teams = tuple(f"t{n}" + "x" * size for n in range(3))
        fields = responses.metadata_fields("r" * size, Outcome.INJECTED)
        appended = responses.with_metadata(b"", fields, "c", teams)
        slow = ext_proc.ProcessingResponse()
        slow.dynamic_metadata.update({METADATA_NAMESPACE: {
            "route": "r" * size, "credential_source": "injected", "outcome": "injected",
            "client": "c", "teams": list(teams)}})  # fmt: skip
        assert ext_proc.ProcessingResponse.FromString(appended) == slow, size
        assert len(appended) == slow.ByteSize(), size
