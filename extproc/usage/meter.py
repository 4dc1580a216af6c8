"""One observed response: who paid, for what model, how many tokens.

Envoy's second ext_proc filter runs in observability mode on metered routes:
it sends the request headers (with the decision's dynamic metadata), the
response headers and the response body as they pass, and never waits for an
answer, so no byte to the client waits on this. ``MeterStream`` follows one
such gRPC stream and reports once, when it ends (a response cut by the client
ends it too, with what was seen so far).
"""

from __future__ import annotations

import re
from typing import Protocol

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.config.model import METADATA_NAMESPACE, ErrorStyle, Limit
from extproc.policy.compiled import Policy
from extproc.policy.processor import ATTRIBUTES_KEY, ROUTE_ATTRIBUTE
from extproc.usage.parse import Endpoint, Usage, UsageReader, endpoint

_MODEL = re.compile(r"^[A-Za-z0-9._:@/-]{1,80}$")  # a metric label: bounded, printable


class UsageSink(Protocol):
    """Where finished usage goes (the processor's Prometheus metrics)."""

    def usage(self, route: str, client: str, source: str, model: str, usage: Usage) -> None: ...


class Charges(Protocol):
    """The limiter's side of metering: requests in flight and tokens used."""

    def started(self, client: str) -> None: ...

    def finished(self, client: str) -> None: ...

    def charge(self, client: str, limit: Limit, tokens: int) -> None: ...


class MeterStream:
    """Follows one observability-mode ext_proc stream; ``end`` reports it exactly once."""

    __slots__ = (
        "_charges", "_client", "_counting", "_done", "_endpoint", "_limit", "_reader", "_route",
        "_sink", "_source", "_style",
    )  # fmt: skip

    def __init__(self, sink: UsageSink, charges: Charges | None) -> None:
        self._sink = sink
        self._charges = charges
        self._route = ""  # empty: not a route the policy knows, nothing to report
        self._client = ""
        self._source = "client"
        self._style = ErrorStyle.ANTHROPIC
        self._endpoint = Endpoint.OTHER
        self._reader: UsageReader | None = None
        self._counting = False
        self._done = False
        self._limit: Limit | None = None  # the client's limit, when it spends our key

    def on_message(self, policy: Policy, request: ext_proc.ProcessingRequest) -> None:
        phase = request.WhichOneof("request")
        if phase == "request_headers":
            self._request(policy, request)
        elif phase == "response_headers" and self._route:
            self._response(request.response_headers.headers)
        elif phase == "response_body" and self._reader is not None:
            self._reader.feed(request.response_body.body)

    def end(self) -> None:
        """The stream is over (ended, finished or reset): report what was seen."""
        if self._done:
            return
        self._done = True
        if self._counting and self._charges is not None:
            self._charges.finished(self._client)
        if not self._route:
            return
        usage = self._reader.finish() if self._reader is not None else Usage()
        model = usage.model if _MODEL.match(usage.model) else ("other" if usage.model else "")
        self._sink.usage(self._route, self._client, self._source, model or "unknown", usage)
        if self._limit is not None and self._charges is not None:
            self._charges.charge(self._client, self._limit, usage.total)

    def _request(self, policy: Policy, request: ext_proc.ProcessingRequest) -> None:
        envoy_name = request.attributes[ATTRIBUTES_KEY].fields[ROUTE_ATTRIBUTE].string_value
        route = policy.routes.get(envoy_name)
        if route is None:
            return
        self._route, self._style = route.name, route.style
        fields = request.metadata_context.filter_metadata[METADATA_NAMESPACE].fields
        # No decision metadata: Envoy's fast path passed a client's own credential.
        self._source = fields["credential_source"].string_value or "client"
        self._client = fields["client"].string_value
        path = _header(request.request_headers.headers, ":path")
        self._endpoint = endpoint(self._style, path)
        if self._source == "injected" and self._client and policy.limits is not None:
            limit = policy.limits.for_client(self._client)
            # Count only what a limit reads: no store keys for clients without one.
            self._limit = limit if limit.tokens is not None else None
            if limit.concurrent is not None and self._charges is not None:
                self._charges.started(self._client)
                self._counting = True

    def _response(self, headers: base_pb2.HeaderMap) -> None:
        if self._endpoint is Endpoint.OTHER or _header(headers, ":status") != "200":
            return
        streaming = "text/event-stream" in _header(headers, "content-type")
        self._reader = UsageReader(self._style, streaming)


def _header(headers: base_pb2.HeaderMap, name: str) -> str:
    for header in headers.headers:
        if header.key == name:
            value: bytes = header.raw_value
            return value.decode("latin-1")
    return ""
