"""SIGTERM to ``python -m extproc up`` while SSE streams are in flight.

The upstream sends each stream's first event and then holds every stream
until the test lets them go, so the streams are provably in flight when the
signal arrives and still in flight when the test checks that new connections
are refused. No clock decides anything: the order of events does.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import RecordingUpstream, http1, sse_event, sse_events
from harness.liveops import DEADLINE_S, UpProcess, accepts_connections, poll, running_up

SERVER_KEY = "sk-ant-api03-shutdown-server-key"
STREAMS = 3
EVENTS = 4

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


@dataclass
class Stream:
    """One SSE request read on its own thread."""

    base_url: str
    events: list[bytes] = field(default_factory=list)
    status: int | None = None
    error: str = ""
    first_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        target = f"/anthropic/sse?hold=1&events={EVENTS}&pause_ms=20"
        try:
            with http1(self.base_url) as client, client.stream("GET", target) as reply:
                self.status = reply.status_code
                for event in sse_events(reply.iter_raw()):
                    self.events.append(event)
                    self.first_event.set()
        except Exception as exc:  # recorded and asserted on by the test
            self.error = repr(exc)
        finally:
            self.first_event.set()  # never leave the test waiting

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive(), "stream still running"


@pytest.fixture
def up(
    tmp_path: Path, upstream: RecordingUpstream, watch: Callable[..., None]
) -> Iterator[UpProcess]:
    with running_up(tmp_path / "up", upstream, watch, SERVER_KEY) as process:
        yield process


def test_sigterm_to_up_lets_streams_in_flight_finish_refuses_new_connections_and_exits_0_with_both_children_gone(
    up: UpProcess, upstream: RecordingUpstream
) -> None:
    assert sorted("envoy" in child.command for child in up.children) == [False, True]
    streams = [Stream(up.base_url).start() for _ in range(STREAMS)]
    for stream in streams:
        assert stream.first_event.wait(DEADLINE_S), "stream never started"
        assert stream.events == [sse_event(1)], stream
    up.signal(signal.SIGTERM)
    poll(
        lambda: accepts_connections(up.listener_port),
        lambda accepted: not accepted,
        "new connections refused",
    )
    assert not upstream.sse_finished.is_set()  # the streams are still being held
    assert all(stream.thread and stream.thread.is_alive() for stream in streams)
    upstream.sse_release.set()
    for stream in streams:
        stream.join()
        assert (stream.status, stream.error) == (200, "")
        assert stream.events == [sse_event(n) for n in range(1, EVENTS + 1)]
    assert up.wait(DEADLINE_S * 2) == 0
    assert not [child for child in up.children if child.alive()]
    assert not accepts_connections(up.listener_port)
    assert [r.values("x-api-key") for r in upstream.requests] == [[SERVER_KEY.encode()]] * STREAMS
