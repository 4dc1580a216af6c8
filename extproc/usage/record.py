"""One finished request as Envoy's access-log service reports it: the contract between
metering (which builds records), the metrics and limits, and spend (which prices them).

Built off the byte path, from a batch of Envoy's gRPC access-log entries; nothing
here ever holds a credential, a gateway key or a token — only the client's name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one request used and who paid; token counts None where not reported."""

    time: float  # request start, seconds since the epoch (UTC)
    request_id: str
    route: str  # the YAML route name (not Envoy's digest-suffixed one)
    client: str  # the gateway client (or SSO person); "" when the client paid or is unknown
    teams: tuple[str, ...]  # the client's teams, for team budgets and labels
    credential_source: str  # "injected" (the organisation paid), "client" or "none"
    model: str  # as the provider reported it; "" when unknown
    status: int  # HTTP status sent to the client (0: none was sent)
    duration_ms: int
    session_id: str = ""  # Claude Code's x-claude-code-session-id, when sent
    input: int | None = None  # input tokens not served from a cache
    output: int | None = None
    cache_read: int | None = None
    cache_creation_5m: int | None = None  # 5-minute cache writes (1.25x input price)
    cache_creation_1h: int | None = None  # 1-hour cache writes (2x input price)
    complete: bool = True  # False: the stream was cut before its final usage arrived

    @property
    def charged(self) -> bool:
        """The organisation's key paid: its cost counts against budgets."""
        return self.credential_source == "injected"

    @property
    def known(self) -> bool:
        return self.input is not None or self.output is not None

    @property
    def cache_creation(self) -> int | None:
        parts = [v for v in (self.cache_creation_5m, self.cache_creation_1h) if v is not None]
        return sum(parts) if parts else None

    @property
    def total_tokens(self) -> int:
        """Every reported token, for token limits."""
        kinds = (self.input, self.output, self.cache_read, self.cache_creation)
        return sum(v for v in kinds if v is not None)
