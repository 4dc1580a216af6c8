"""The key commands: add, rotate, revoke, list and keygen --append, on real files.

Every refusal leaves the file byte for byte as it was and is one line on stderr
with exit code 2; no output ever holds a key except the new one, printed once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from extproc.cli import main
from extproc.policy.access import Identity, KeyLine, key_digest, parse_line, read_keys
from extproc.policy.keysfile import KeysFile, created, listing, parse_duration, parse_expiry

A, B, C = "a" * 64, "ab" + "c" * 62, "ab" + "d" * 62  # B and C share the id prefix "ab"
FILE = f"# the team's keys\nalice sha256:{A} teams=ml  # laptop\n\nbob sha256:{B}\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def printed_key(out: str) -> str:
    return next(word for word in out.split() if word.startswith("gk-"))


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(FILE)
    return path


def identities(path: Path) -> dict[str, Identity]:
    """Each key's identity by the key's digest."""
    return {d.hex(): i for d, i in read_keys(path).by_digest.items()}


# -- add --------------------------------------------------------------------------------


def test_add_creates_the_file_and_prints_the_key_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new.txt"
    code, out, _ = run(
        capsys, "keys", "add", str(path), "carol", "--team", "ml", "--team", "data,ml",
        "--expires", "2027-01-01",
    )  # fmt: skip
    key = printed_key(out)
    assert code == 0 and out.count(key) == 1 and key not in path.read_text()
    today = datetime.now(UTC).date().isoformat()
    assert path.read_text() == (
        f"carol sha256:{key_digest(key)} created={today} expires=2027-01-01T00:00:00Z "
        "teams=data,ml\n"
    )
    assert identities(path)[key_digest(key)] == Identity("carol", ("data", "ml"), 1798761600.0)


def test_add_appends_to_an_existing_file_keeping_everything_else(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "keys", "add", str(keys), "carol")
    key = printed_key(out)
    assert code == 0 and keys.read_text().startswith(FILE)
    assert identities(keys)[key_digest(key)] == Identity("carol")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["alice"], "keys.txt:2: client 'alice' already has a key; for a new one use "
         "'keys rotate {path} alice' (the old key keeps working for an overlap)"),
        (["al ice"], "client name 'al ice': use letters, digits, '.', '_', '@' and '-'"),
        (["carol", "--expires", "soon"],
         "--expires 'soon': Invalid isoformat string: 'soon' (or give a duration such as 90d)"),
        (["carol", "--expires", "2027-01-01T00:00:00"], "--expires '2027-01-01T00:00:00': needs "
         "a time zone, e.g. 2027-01-01T00:00:00Z (or give a duration such as 90d)"),
        (["carol", "--team", "a/b"],
         "--team: use comma-separated names of letters, digits, '.', '_', '@' and '-'"),
    ],
)  # fmt: skip
def test_a_refused_add_is_one_line_and_leaves_the_file_unchanged(
    keys: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = keys.read_bytes()
    code, out, err = run(capsys, "keys", "add", str(keys), *argv)
    assert (code, out, keys.read_bytes()) == (2, "", before)
    assert err.endswith(message.format(path=keys) + "\n") and err.count("\n") == 1


# -- rotate -----------------------------------------------------------------------------


def test_rotate_adds_a_key_and_the_old_one_expires_after_the_overlap(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    code, out, _ = run(capsys, "keys", "rotate", str(keys), "alice", "--overlap", "7d")
    after = datetime.now(UTC)
    key = printed_key(out)
    found = identities(keys)
    old_expiry = found[A].expires
    assert code == 0 and key not in keys.read_text()
    assert (
        (before + timedelta(days=7)).timestamp()
        <= old_expiry
        <= (after + timedelta(days=7)).timestamp()
    )
    assert found[key_digest(key)] == Identity("alice", ("ml",))  # the client's teams kept
    assert found[B] == Identity("bob")
    lines = keys.read_text().splitlines()
    assert lines[0] == "# the team's keys" and lines[1].endswith("teams=ml  # laptop")
    assert lines[2:4] == ["", f"bob sha256:{B}"]


def test_rotate_keeps_an_earlier_expiry_and_zero_overlap_ends_the_old_key_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice sha256:{A} expires=2020-01-01\nalice sha256:{B}\n")
    start = datetime.now(UTC).replace(microsecond=0).timestamp()
    assert run(capsys, "keys", "rotate", str(path), "alice", "--overlap", "0")[0] == 0
    found = identities(path)
    assert found[A].expires == datetime(2020, 1, 1, tzinfo=UTC).timestamp()
    assert start <= found[B].expires <= datetime.now(UTC).timestamp()


def test_rotate_with_teams_replaces_them_on_every_key_of_the_client(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "keys", "rotate", str(keys), "alice", "--team", "platform")
    assert code == 0
    found = identities(keys)
    assert found[A].teams == found[key_digest(printed_key(out))].teams == ("platform",)


def test_rotate_for_an_unknown_client_points_at_add(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = keys.read_bytes()
    code, _, err = run(capsys, "keys", "rotate", str(keys), "carol")
    assert (code, keys.read_bytes()) == (2, before)
    assert err == f"{keys}: no client 'carol'; for a first key use 'keys add {keys} carol'\n"


# -- revoke -----------------------------------------------------------------------------


def test_revoke_a_name_removes_all_its_keys_and_keeps_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# keys\nbob sha256:{B}  # old\nalice sha256:{A}\nbob sha256:{C}\n")
    code, out, _ = run(capsys, "keys", "revoke", str(path), "bob")
    assert (code, out) == (0, f"revoked 2 key(s) of bob in {path}\n")
    assert path.read_text() == f"# keys\nalice sha256:{A}\n"


def test_revoke_one_key_by_its_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys"
    path.write_text(f"bob sha256:{B}\nbob sha256:{C}\n")
    assert run(capsys, "keys", "revoke", str(path), "bob", "--key", C[:10].upper())[0] == 0
    assert path.read_text() == f"bob sha256:{B}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["carol"], "{path}: no client 'carol'; for a first key use 'keys add {path} carol'"),
        (["bob", "--key", "abccc"], "key id 'abccc': give at least 6 hex digits from 'keys list'"),
        (["bob", "--key", "abcxyz"], "key id 'abcxyz': give at least 6 hex digits from 'keys list'"),
        (["bob", "--key", "abcccd"], "{path}: no key of 'bob' has id abcccd"),
        (["alice", "--key", "abcccc"], "{path}: no key of 'alice' has id abcccc"),
    ],
)  # fmt: skip
def test_a_refused_revoke_leaves_the_file_unchanged(
    keys: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = keys.read_bytes()
    code, _, err = run(capsys, "keys", "revoke", str(keys), *argv)
    assert (code, err, keys.read_bytes()) == (2, message.format(path=keys) + "\n", before)


def test_an_id_shared_by_two_keys_asks_for_more_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"bob sha256:{'abcdef1' + '0' * 57}\nbob sha256:{'abcdef2' + '0' * 57}\n")
    before = path.read_bytes()
    code, _, err = run(capsys, "keys", "revoke", str(path), "bob", "--key", "abcdef")
    assert (code, path.read_bytes()) == (2, before)
    assert err == f"{path}: key id abcdef matches 2 keys of 'bob': give more digits\n"


# -- list -------------------------------------------------------------------------------


def test_list_shows_names_ids_dates_and_teams_never_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    code, out, _ = run(capsys, "keys", "add", str(path), "alice", "--team", "ml")
    key = printed_key(out)
    with path.open("a") as f:
        f.write(f"bob sha256:{B} created=2026-01-02 expires=2026-02-01\n")
    code, out, _ = run(capsys, "keys", "list", str(path))
    today = datetime.now(UTC).date().isoformat()
    assert code == 0 and key not in out and key_digest(key) not in out
    assert out.splitlines() == [
        "NAME   KEY ID      CREATED     EXPIRES                         TEAMS",
        f"alice  {key_digest(key)[:10]}  {today}  never                           ml",
        f"bob    {B[:10]}  2026-01-02  2026-02-01T00:00:00Z (expired)  -",
    ]


def test_listing_marks_a_key_expired_from_its_expiry_on() -> None:
    keys = KeysFile(Path("k"), (), {0: parse("alice", "expires=2027-01-01")})
    new_year = datetime(2027, 1, 1, tzinfo=UTC)
    assert listing(keys, new_year - timedelta(seconds=1))[0][3] == "2027-01-01T00:00:00Z"
    assert listing(keys, new_year)[0][3] == "2027-01-01T00:00:00Z (expired)"


def parse(name: str, attributes: str) -> KeyLine:
    return parse_line(f"{name} sha256:{A} {attributes}")


# -- every command on a file it cannot use -------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["add", "carol"], ["rotate", "alice"], ["revoke", "alice"], ["list"]],
)
def test_every_command_refuses_a_bad_file_naming_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice sha256:{A}\nalice sha256:{A} teams=ml\n")
    before = path.read_bytes()
    code, out, err = run(capsys, "keys", argv[0], str(path), *argv[1:])
    assert (code, out, path.read_bytes()) == (2, "", before)
    assert err == f"{path}:2: the same key is listed for 'alice'\n"


@pytest.mark.parametrize("command", ["rotate", "revoke", "list"])
def test_a_missing_file_is_one_line_for_commands_that_need_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "absent"
    args = [] if command == "list" else ["alice"]
    code, _, err = run(capsys, "keys", command, str(path), *args)
    assert (code, err, path.exists()) == (
        2, f"keys file {path} cannot be read: No such file or directory\n", False
    )  # fmt: skip


# -- the rewrite ------------------------------------------------------------------------


def test_the_file_is_replaced_atomically_with_its_mode_and_no_temp_file_left(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys.chmod(0o640)
    inode = keys.stat().st_ino
    assert run(capsys, "keys", "add", str(keys), "carol")[0] == 0
    assert keys.stat().st_mode & 0o7777 == 0o640
    assert keys.stat().st_ino != inode  # a new file renamed over the old, not written in place
    assert sorted(p.name for p in keys.parent.iterdir()) == ["keys.txt"]


def test_a_symlinked_file_is_rewritten_where_it_points(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = keys.parent / "link"
    link.symlink_to(keys)
    assert run(capsys, "keys", "revoke", str(link), "bob")[0] == 0
    assert link.is_symlink() and "bob" not in keys.read_text()


# -- keygen -----------------------------------------------------------------------------


def test_keygen_append_refuses_a_name_the_file_has(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = keys.read_bytes()
    code, out, err = run(capsys, "keygen", "alice", "--append", str(keys))
    assert (code, out, keys.read_bytes()) == (2, "", before)
    assert "client 'alice' already has a key" in err and "keys rotate" in err


def test_keygen_without_a_file_prints_a_line_with_the_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "keygen", "dave", "--team", "ml", "--expires", "2027-01-01")
    key = printed_key(out)
    line = out.splitlines()[-1].strip()
    assert code == 0 and line.startswith(f"dave sha256:{key_digest(key)} created=")
    assert line.endswith(" expires=2027-01-01T00:00:00Z teams=ml")


@pytest.mark.parametrize(
    ("where", "reason"),
    [("missing/dir/keys.txt", "cannot be written: No such file or directory"), (".", "")],
)
def test_keygen_append_where_it_cannot_is_one_line_without_traceback(
    tmp_path: Path, where: str, reason: str
) -> None:
    target = tmp_path / where
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "keygen", "carol", "--append", str(target)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"keys file {target} ") and reason in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "gk-" not in result.stderr


# -- durations and times ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800)],
)
def test_a_duration_is_a_number_and_a_unit(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7w", "-1d", "1.5h", "d"])
def test_a_bad_duration_names_itself(text: str) -> None:
    with pytest.raises(ValueError, match="use a number and s, m, h or d"):
        parse_duration(text)


def test_an_expiry_is_a_duration_from_now_or_a_time() -> None:
    now = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
    assert parse_expiry("90d", now) == now + timedelta(days=90)
    assert parse_expiry("2027-01-01T01:00:00+01:00", now) == datetime(2027, 1, 1, tzinfo=UTC)


# -- what mutation testing asked for ----------------------------------------------------


def test_rotate_writes_the_lines_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice sha256:{A}  # laptop # 2026\nalice sha256:{B}\n")
    code, out, _ = run(
        capsys, "keys", "rotate", str(path), "alice", "--overlap", "0", "--expires", "2027-01-01"
    )
    key = printed_key(out)
    old, older, new = path.read_text().splitlines()
    assert code == 0 and old.endswith("Z  # laptop # 2026") and "#" not in older
    today = datetime.now(UTC).date().isoformat()
    assert new == f"alice sha256:{key_digest(key)} created={today} expires=2027-01-01T00:00:00Z"


def test_a_file_that_cannot_be_written_is_one_line_and_no_temp_file_is_left(
    keys: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = keys.read_bytes()

    def refuse(source: str, target: Path) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    code, out, err = run(capsys, "keys", "add", str(keys), "carol")
    assert (code, out, keys.read_bytes()) == (2, "", before)
    assert err == f"keys file {keys} cannot be written: Permission denied\n"
    assert sorted(p.name for p in keys.parent.iterdir()) == ["keys.txt"]


def test_the_temp_file_is_hidden_beside_the_keys_file(
    keys: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed: list[tuple[Path, Path]] = []
    replace = os.replace

    def spy(source: str, target: Path) -> None:
        renamed.append((Path(source), Path(target)))
        replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    assert run(capsys, "keys", "add", str(keys), "carol")[0] == 0
    [(source, target)] = renamed
    assert source.parent == target.parent == keys.parent
    assert source.name.startswith(".keys.txt.") and target == keys


@pytest.mark.parametrize(("umask", "mode"), [(0o027, 0o640), (0, 0o666)])
def test_a_new_file_gets_the_umasks_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], umask: int, mode: int
) -> None:
    old = os.umask(umask)
    try:
        assert run(capsys, "keys", "add", str(tmp_path / "keys"), "carol")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "keys").stat().st_mode & 0o7777 == mode


def test_listing_shows_every_team_and_a_dash_for_what_is_absent() -> None:
    keys = KeysFile(
        Path("k"), (), {0: parse("alice", "teams=ml,data"), 1: parse_line(f"bob sha256:{B}")}
    )
    rows = listing(keys, datetime(2027, 1, 1, tzinfo=UTC))
    assert [row[2:] for row in rows] == [("-", "never", "data,ml"), ("-", "never", "-")]


def test_created_is_the_utc_date_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert created(datetime(2026, 12, 7, 20, tzinfo=UTC)) == "2026-12-07"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
