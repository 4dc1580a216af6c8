"""The watcher and SIGHUP share one PolicyHolder: a change is loaded once, not by both."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from extproc.runtime.reload import PolicyHolder, watch
from extproc.server.metrics import Metrics

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - {name: plain, prefix: /plain, upstream: 'http://127.0.0.1:1'}
"""


def loaded_by_the_watcher(holder: PolicyHolder, change: Callable[[], None]) -> list[bool]:
    """The watcher's loads (their results) while ``change`` happens, then for 0.6 s."""
    loads: list[bool] = []
    stop = threading.Event()

    def load() -> bool:
        loads.append(holder.load())
        return True

    thread = threading.Thread(target=watch, args=(holder, stop, load, 0.05))
    thread.start()
    try:
        time.sleep(0.1)  # the watcher has read the files once
        change()
        time.sleep(0.6)  # several polls and a settle
    finally:
        stop.set()
        thread.join(5)
    return loads


def holder_for(tmp_path: Path) -> tuple[PolicyHolder, Path]:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    holder = PolicyHolder(path, Metrics(), environ={})
    assert holder.load()
    return holder, path


def test_a_change_a_sighup_loaded_is_not_loaded_again_by_the_watcher(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)

    def edit_then_sighup() -> None:
        path.write_text(CONFIG.replace("/plain", "/plain2"))
        assert holder.load()

    assert loaded_by_the_watcher(holder, edit_then_sighup) == []
    assert holder.config is not None and holder.config.routes[0].prefix == "/plain2/"


def test_a_change_nobody_loaded_is_loaded_once_by_the_watcher(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)
    loads = loaded_by_the_watcher(holder, lambda: path.write_text(CONFIG.replace("/plain", "/p3")))
    assert loads == [True]
    assert holder.config is not None and holder.config.routes[0].prefix == "/p3/"


def test_a_broken_change_a_sighup_tried_is_not_tried_again(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)

    def break_then_sighup() -> None:
        path.write_text("listener: [\n")
        assert not holder.load()  # reported once, by the SIGHUP's attempt

    assert loaded_by_the_watcher(holder, break_then_sighup) == []
