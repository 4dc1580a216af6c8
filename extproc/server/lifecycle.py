"""What a processor server backend calls back into while it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hooks:
    on_started: Callable[[], None]  # listening: mark SERVING, start watching
    on_reload: Callable[[], None]  # SIGHUP: reload config and secrets now
    grace_s: float  # how long streams in flight may take after SIGTERM
