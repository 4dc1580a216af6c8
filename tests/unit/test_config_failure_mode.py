"""``failure_mode: open`` forwards requests unchanged while the processor is down or slow, so
it is refused wherever a gateway key could be on its way to a provider."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.config.load import load_config
from extproc.config.model import FailureMode
from extproc.config.sections import ConfigError

ROUTES = """\
listener: {address: 127.0.0.1, port: 4000}
extproc:
  failure_mode: open
routes:
  - name: anthropic
    prefix: /anthropic/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: K}}
"""
REFUSED = (
    "gateway.yaml:3 extproc.failure_mode: open cannot be used with gateway keys: while the "
    "processor is down or slow, requests would be forwarded unchanged and a gateway key "
    "(gk-...) would reach the provider (routes with access: {routes}); use closed"
)


def write(folder: Path, text: str) -> Path:
    (folder / "keys.txt").write_text("")
    path = folder / "gateway.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("top-level access", ROUTES + "access: {keys_file: keys.txt}\n"),
        ("a route's own access", ROUTES + "    access: {keys_file: keys.txt}\n"),
    ],
)
def test_open_with_gateway_keys_is_refused_at_the_failure_mode_line(
    where: str, text: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.problems == (REFUSED.format(routes="anthropic"),)


def test_open_without_gateway_keys_is_allowed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ROUTES))
    assert config.extproc.failure_mode is FailureMode.OPEN


def test_open_is_allowed_when_every_route_opts_out_of_the_default_access(tmp_path: Path) -> None:
    text = ROUTES + "    access: false\naccess: {keys_file: keys.txt}\n"
    assert load_config(write(tmp_path, text)).extproc.failure_mode is FailureMode.OPEN


def test_closed_with_gateway_keys_is_the_default_and_allowed(tmp_path: Path) -> None:
    text = ROUTES.replace("extproc:\n  failure_mode: open\n", "") + "access: {keys_file: k}\n"
    config = load_config(write(tmp_path, text))
    assert config.extproc.failure_mode is FailureMode.CLOSED
    assert config.routes[0].access is not None
