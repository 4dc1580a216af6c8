"""Usage records into the metrics, the limits and the sinks, one batch at a time.

Envoy counts the tokens (its Lua meter) and sends one access-log entry per finished
request; ``Meter.batch`` reads a ``StreamAccessLogsMessage`` into ``UsageRecord``s and
hands them on. Requests in flight (for concurrency limits) start when the limiter admits
them and end when their record arrives: the same rule decides both (the organisation's key
paid, for a client with a ``concurrent`` limit), so a count taken is given back once (a
record lost ends nothing: its lease runs out, see the README's "Loss").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from extproc.config.model import Limit
from extproc.policy.compiled import Policy
from extproc.policy.limits import LimitTable
from extproc.usage.record import UsageRecord
from extproc.usage.records import RecordSink, UnreadableEntry, meter_failed, record

log = logging.getLogger("extproc.usage")


class Charges(Protocol):
    """The limiter's side of metering: the end of requests in flight and tokens used."""

    def finished(self, client: str) -> None: ...

    def charge(self, client: str, limit: Limit, tokens: int) -> None: ...


class UsageMetrics(Protocol):
    def usage(self, record: UsageRecord, limits: LimitTable | None) -> None: ...

    def unreadable(self, count: int) -> None: ...

    def meter_errors(self, count: int) -> None: ...


class Meter:
    """Reads batches of access-log entries; every record goes to the metrics, the limits and
    each sink. An entry that cannot be read is counted, never raised."""

    def __init__(
        self, metrics: UsageMetrics, charges: Charges | None, sinks: Sequence[RecordSink] = ()
    ) -> None:
        self._metrics = metrics
        self._charges = charges
        self._sinks = tuple(sinks)

    def batch(self, policy: Policy, message: bytes) -> None:
        try:
            entries = als_pb2.StreamAccessLogsMessage.FromString(message).http_logs.log_entry
        except DecodeError:
            self._metrics.unreadable(1)
            return
        found: list[UsageRecord] = []
        unreadable = failed = 0
        for entry in entries:
            try:
                one = record(policy, entry)
            except UnreadableEntry:
                unreadable += 1
                continue
            failed += meter_failed(entry)
            if one is not None:
                found.append(one)
        if unreadable:
            self._metrics.unreadable(unreadable)
        if failed:
            self._metrics.meter_errors(failed)
        for one in found:
            self._metrics.usage(one, policy.limits)
            self._limits(policy, one)
        for sink in self._sinks:
            try:
                sink.records(found)
            except Exception:  # one sink's bug must not cost the others (or this stream)
                log.exception("a usage sink failed on a batch of %d records", len(found))

    def _limits(self, policy: Policy, one: UsageRecord) -> None:
        """The end of a request in flight (the rule ``Limiter.admit`` counted it by) and its
        tokens, with the client's limit looked up once."""
        charges, limits = self._charges, policy.limits
        if charges is None or limits is None or not one.charged or not one.client:
            return
        limit = limits.for_client(one.client)
        if limit.concurrent is not None:
            charges.finished(one.client)
        if limit.tokens is not None:
            charges.charge(one.client, limit, one.total_tokens)
