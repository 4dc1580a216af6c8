"""Gateway keys: the keys file, keygen, and the access settings in the YAML."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from harness.keys import key_line

from extproc.config.load import load_config, warnings
from extproc.config.sections import ConfigError
from extproc.policy.access import (
    GatewayKeys,
    Identity,
    KeyLine,
    KeysFileError,
    format_time,
    new_key,
    parse_line,
    read_keys,
)
from extproc.policy.compiled import compile_policy

ROUTE = """\
routes:
  - name: a
    prefix: /a/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: K}}
"""


A, B = "a" * 64, "b" * 64
NEW_YEAR = 1798761600.0  # 2027-01-01T00:00:00Z


def test_a_generated_key_matches_only_its_own_line(tmp_path: Path) -> None:
    key, other = new_key(), new_key()
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        f"# team keys\n{key_line('alice', key)}\n\n{key_line('bob', other)}  # laptop\n"
    )
    keys = GatewayKeys("x-gateway-key", read_keys(keys_file), False)
    assert keys.identify(key.encode()) == Identity("alice")
    assert keys.identify(other.encode()) == Identity("bob")
    assert keys.identify(b"gk-guess") is None and keys.identify(None) is None
    assert key not in keys_file.read_text()


@pytest.mark.parametrize(
    ("case", "line", "identity"),
    [
        ("today's line, no attributes: never expires, no teams",
         f"alice sha256:{A}", Identity("alice")),
        ("every attribute; teams sorted, each once",
         f"alice sha256:{A} created=2026-12-07 expires=2027-01-01T00:00:00Z teams=platform,ml,ml",
         Identity("alice", ("ml", "platform"), NEW_YEAR)),
        ("an expiry that is a date means 00:00 UTC",
         f"alice sha256:{A} expires=2027-01-01", Identity("alice", (), NEW_YEAR)),
        ("an expiry in another zone",
         f"alice sha256:{A} expires=2027-01-01T02:00:00+02:00", Identity("alice", (), NEW_YEAR)),
        ("attributes in any order, a comment after them",
         f"alice sha256:{A} teams=ml created=2026-12-07T10:00:00Z  # laptop",
         Identity("alice", ("ml",))),
    ],
)  # fmt: skip
def test_a_good_line_yields_its_identity(
    tmp_path: Path, case: str, line: str, identity: Identity
) -> None:
    (tmp_path / "keys").write_text(line + "\n")
    assert dict(read_keys(tmp_path / "keys").by_digest) == {bytes.fromhex(A): identity}


def test_a_client_may_hold_several_keys_with_their_own_expiries(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(
        f"alice sha256:{A} expires=2027-01-01 teams=ml\nalice sha256:{B} teams=ml\n"
    )
    table = read_keys(tmp_path / "keys")
    assert dict(table.by_digest) == {
        bytes.fromhex(A): Identity("alice", ("ml",), NEW_YEAR),
        bytes.fromhex(B): Identity("alice", ("ml",)),
    }


SHAPE = "expected '<name> sha256:<64 hex digits> [created=…] [expires=…] [teams=…]'"
UNKNOWN = "unknown attribute: use created=, expires= or teams="


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice sha256:1234\n", f"keys:1: {SHAPE}"),
        ("gk-plaintext-key-pasted-here\n", f"keys:1: {SHAPE}"),
        (f"alice gk-plaintext-key-pasted-here sha256:{A}\n", f"keys:1: {SHAPE}"),
        (f"alice sha256:{A} gk-plaintext-key-pasted-here\n", f"keys:1: {UNKNOWN}"),
        (f"alice sha256:{A} colour=red\n", f"keys:1: {UNKNOWN}"),
        (f"alice sha256:{A} teams\n", f"keys:1: {UNKNOWN}"),
        (f"alice sha256:{A} teams=a teams=b\n", "keys:1: teams is given twice"),
        (f"alice sha256:{A} expires=soon\n", "keys:1: expires: Invalid isoformat string: 'soon'"),
        (f"alice sha256:{A} expires=2027-01-01T00:00:00\n",
         "keys:1: expires: needs a time zone, e.g. 2027-01-01T00:00:00Z"),
        (f"alice sha256:{A} expires=2027-02-30\n", "keys:1: expires: day is out of range for month"),
        (f"alice sha256:{A} created=yesterday\n",
         "keys:1: created: Invalid isoformat string: 'yesterday'"),
        (f"alice sha256:{A} teams=ml,\n", "keys:1: teams: use comma-separated names of letters, "
         "digits, '.', '_', '@' and '-'"),
        (f"alice sha256:{A} teams=a/b\n", "keys:1: teams: use comma-separated names of letters, "
         "digits, '.', '_', '@' and '-'"),
        (f"alice sha256:{A}\nalice sha256:{A} expires=2027-01-01\n",
         "keys:2: the same key is listed for 'alice'"),
        (f"alice sha256:{A}\nbob sha256:{A}\n", "keys:2: the same key is listed for 'alice'"),
        (f"alice sha256:{A} teams=ml\n# old\nalice sha256:{B} teams=ml,platform\n",
         "keys:3: client 'alice' has teams ml,platform here but ml on line 1: "
         "every key of a client names its teams"),
        (f"alice sha256:{A} teams=ml\nalice sha256:{B}\n",
         "keys:2: client 'alice' has teams (none) here but ml on line 1: "
         "every key of a client names its teams"),
    ],
)  # fmt: skip
def test_a_bad_keys_file_names_the_line_never_the_content(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "keys").write_text(text)
    with pytest.raises(KeysFileError) as caught:
        read_keys(tmp_path / "keys")
    assert str(caught.value) == f"{tmp_path}/{message}"
    assert "plaintext" not in str(caught.value)


def test_keygen_prints_the_key_once_and_appends_only_the_hash(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "keygen", "carol", "--append", str(keys_file)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = next(word for word in result.stdout.split() if word.startswith("gk-"))
    assert key not in keys_file.read_text()
    assert GatewayKeys("x-gateway-key", read_keys(keys_file), False).identify(
        key.encode()
    ) == Identity("carol")


def test_top_level_access_applies_to_every_credential_route_unless_turned_off(
    tmp_path: Path,
) -> None:
    (tmp_path / "keys").write_text(key_line("alice", "k") + "\n")
    (tmp_path / "gateway.yaml").write_text(
        "listener: {address: 0.0.0.0, port: 4000}\naccess: {keys_file: keys}\n" + ROUTE
        + "  - {name: b, prefix: /b/, upstream: 'https://x.example', access: false,\n"
        "     credential: {header: x-api-key, secret: {env: K}}}\n"
    )  # fmt: skip
    config = load_config(tmp_path / "gateway.yaml")
    assert (
        config.routes[0].access is not None
        and config.routes[0].access.keys_file == tmp_path / "keys"
    )
    assert config.routes[1].access is None
    assert [r.name for r in config.open_relay_routes()] == ["b"]
    assert "route b spends the server key for anyone" in warnings(config)[0]
    compile_policy(config, {"K": "server"})


def test_require_access_turns_the_open_relay_warning_into_an_error(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(
        "listener: {address: 0.0.0.0, port: 4000, require_access: true}\n" + ROUTE
    )
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "gateway.yaml")
    assert caught.value.problems == (
        "gateway.yaml:3 routes[0]: route a spends the server key for anyone who reaches the listener: "
        "configure access (gateway keys) or bind the listener to a loopback address",
    )


def test_a_loopback_listener_needs_no_access_control(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("listener: {address: 127.0.0.1, port: 4000}\n" + ROUTE)
    assert warnings(load_config(tmp_path / "gateway.yaml")) == []


def test_a_missing_keys_file_is_a_load_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(
        "listener: {address: 127.0.0.1, port: 4000}\naccess: {keys_file: nope}\n" + ROUTE
    )
    with pytest.raises(ConfigError) as caught:
        compile_policy(load_config(tmp_path / "gateway.yaml"), {"K": "server"})
    assert caught.value.problems == (
        f"gateway.yaml:2 access: keys file {tmp_path}/nope cannot be read: No such file or directory",
    )


def test_an_unchanged_file_is_not_parsed_again_and_a_changed_one_is(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice sha256:{A}\n")
    first = read_keys(path)
    assert first.digest == hashlib.sha256(path.read_bytes()).digest()
    assert read_keys(path, first) is first
    path.write_text(f"bob sha256:{A}\n")
    assert dict(read_keys(path, first).by_digest) == {bytes.fromhex(A): Identity("bob")}


def test_a_parsed_line_keeps_what_it_was_given_and_no_more() -> None:
    assert parse_line(f"alice sha256:{A}") == KeyLine("alice", A)
    line = parse_line(f"alice sha256:{A} created=2026-12-07 teams=ml")
    assert line == KeyLine("alice", A, "2026-12-07", None, ("ml",))
    assert line.text() == f"alice sha256:{A} created=2026-12-07 teams=ml"


def test_an_attribute_value_may_not_hold_another_equals_sign() -> None:
    with pytest.raises(ValueError, match=r"^teams: use comma-separated names"):
        parse_line(f"alice sha256:{A} teams=ml=platform")


def test_an_expiry_is_written_in_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        moment = datetime(2027, 1, 1, 9, tzinfo=timezone(timedelta(hours=9)))
        assert format_time(moment) == "2027-01-01T00:00:00Z"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
