"""Envoy's gRPC access-log entries as ``UsageRecord``s, and where records go.

Envoy sends one entry per finished request, in batches, on a stream that stays open
(``StreamAccessLogs``). Each entry carries the route Envoy matched, the decision's dynamic
metadata (who paid, the gateway client and its teams), the Lua meter's (model, tokens), the
status, the times, the request id and ``x-claude-code-session-id``. Read here, off the byte path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from extproc.config.model import METADATA_NAMESPACE
from extproc.policy.compiled import Policy
from extproc.usage.record import UsageRecord

USAGE_NAMESPACE = "credential_gateway.usage"  # the Lua meter's (extproc.render.metering)
SESSION_HEADER = "x-claude-code-session-id"
ROUTE_SOURCE_TAG = "route_credential_source"  # the route's credential_source (render.metering)
_SOURCES = frozenset({"injected", "client", "none"})
_PRINTABLE = re.compile(r"^[\x21-\x7e]{1,128}$")  # a model or session id kept as sent, bounded
_MAX_COUNT = 2**53  # a JSON number Envoy stored as a double, still exact
_Fields = Mapping[str, struct_pb2.Value]


class RecordSink(Protocol):
    """Takes each batch of records (the metrics and limits, the spend ledger)."""

    def records(self, batch: Sequence[UsageRecord]) -> None: ...


class UnreadableEntry(ValueError):
    """An entry that is not a request the gateway can account for (it is counted)."""


def record(policy: Policy, entry: accesslog_pb2.HTTPAccessLogEntry) -> UsageRecord | None:
    """The record of one entry; None for a request on no route of the policy (404, TRACE)."""
    common = entry.common_properties
    route = policy.routes.get(common.route_name)
    if route is None:
        return None
    metadata = common.metadata.filter_metadata
    empty: _Fields = {}
    decision = metadata[METADATA_NAMESPACE].fields if METADATA_NAMESPACE in metadata else empty
    usage = metadata[USAGE_NAMESPACE].fields if USAGE_NAMESPACE in metadata else empty
    start = common.start_time
    has_duration = common.HasField("duration")
    elapsed = common.duration if has_duration else common.time_to_last_downstream_tx_byte
    headers = entry.request.request_headers
    return UsageRecord(
        time=start.seconds + start.nanos / 1e9,
        request_id=entry.request.request_id[:128],
        route=route.name,
        client=_text(decision, "client"),
        teams=_texts(decision, "teams"),
        credential_source=_source(decision, common.custom_tags),
        model=_bounded(_text(usage, "model")),
        status=entry.response.response_code.value,
        duration_ms=elapsed.seconds * 1000 + elapsed.nanos // 1_000_000,
        session_id=_bounded(headers[SESSION_HEADER]) if SESSION_HEADER in headers else "",
        input=_count(usage, "input"),
        output=_count(usage, "output"),
        cache_read=_count(usage, "cache_read"),
        cache_creation_5m=_count(usage, "cache_5m"),
        cache_creation_1h=_count(usage, "cache_1h"),
        complete=not _flag(usage, "partial"),
    )


def meter_failed(entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
    """The Lua meter hit an error on this response (it passed, uncounted from there on)."""
    metadata = entry.common_properties.metadata.filter_metadata
    return USAGE_NAMESPACE in metadata and _flag(metadata[USAGE_NAMESPACE].fields, "error")


def _source(decision: _Fields, tags: Mapping[str, str]) -> str:
    """Who paid: the decision says; where Envoy skipped the processor, the route's fast-path
    copy says ``client``. Neither (the processor failed or timed out, or Envoy refused first):
    nobody's credential is known to have gone upstream, ``none``."""
    source = _text(decision, "credential_source") or tags.get(ROUTE_SOURCE_TAG, "")
    return source if source in _SOURCES else "none"


def _text(fields: _Fields, key: str) -> str:
    value = _value(fields, key)
    if value is None:
        return ""
    if value.WhichOneof("kind") != "string_value":
        raise UnreadableEntry(f"{key}: expected a string")
    return value.string_value


def _texts(fields: _Fields, key: str) -> tuple[str, ...]:
    """A list of names (the client's teams, as the processor wrote them)."""
    value = _value(fields, key)
    if value is None:
        return ()
    items = value.list_value.values
    if value.WhichOneof("kind") != "list_value" or any(
        v.WhichOneof("kind") != "string_value" for v in items
    ):
        raise UnreadableEntry(f"{key}: expected a list of names")
    return tuple(v.string_value for v in items)


def _count(fields: _Fields, key: str) -> int | None:
    value = _value(fields, key)
    if value is None:
        return None
    number = value.number_value
    if value.WhichOneof("kind") != "number_value" or not (0 <= number < _MAX_COUNT):
        raise UnreadableEntry(f"{key}: expected a token count")
    if not math.isfinite(number) or number != int(number):
        raise UnreadableEntry(f"{key}: expected a whole number")
    return int(number)


def _flag(fields: _Fields, key: str) -> bool:
    value = _value(fields, key)
    return value is not None and value.WhichOneof("kind") == "bool_value" and value.bool_value


def _value(fields: _Fields, key: str) -> struct_pb2.Value | None:
    """A Struct's field, or None (``get``: reading ``[key]`` would insert it)."""
    return fields.get(key)


def _bounded(text: str) -> str:
    return text if _PRINTABLE.match(text) else ""
