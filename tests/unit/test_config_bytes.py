"""Any bytes at all in the config (or its secret and keys files) end in a clear error, never
a traceback or a hang: a model or a ConfigError naming the file, and the line where there is one.

The loader's bounds (size, nesting depth, values after aliases) are the README's; the
properties feed arbitrary bytes, YAML-like structures with anchors and aliases, and
configs one poke away from a valid one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig, SecretRef
from extproc.config.sections import ConfigError
from extproc.config.yamlsource import MAX_BYTES, MAX_DEPTH
from extproc.policy.access import KeysFileError, read_keys
from extproc.policy.secrets import SecretError, read_secret

GOOD = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - name: anthropic
    prefix: /anthropic/
    upstream: http://127.0.0.1:9000
    credential: {header: x-api-key, secret: {env: K}}
"""
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example of a property (hypothesis reruns the test body)."""
    return tmp_path_factory.mktemp("bytes")


def outcome(path: Path) -> GatewayConfig | ConfigError:
    """The loader's answer; any other exception fails the test that called it."""
    try:
        return load_config(path)
    except ConfigError as exc:
        return exc


def problems_of(folder: Path, data: bytes) -> list[str]:
    path = folder / "gateway.yaml"
    path.write_bytes(data)
    result = outcome(path)
    assert isinstance(result, ConfigError)
    return list(result.problems)


def load_in_child(path: Path) -> str:
    """Load in a child process with a deadline, so a loader that hangs fails the test."""
    code = (
        "import sys; from pathlib import Path\n"
        "from extproc.config.load import load_config\n"
        "from extproc.config.sections import ConfigError\n"
        "try:\n    load_config(Path(sys.argv[1]))\n"
        "except ConfigError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


# -- the bytes that broke validate and the live reload --------------------------------------

BAD_BYTES = [
    ("a control character", GOOD.encode().replace(b"prefix:", b"prefix:\x01", 1),
     "gateway.yaml:4 not valid YAML: special characters are not allowed (character #x0001)"),
    ("invalid UTF-8", b"\xff\xfe" + GOOD.encode(), "gateway.yaml:1 not UTF-8 text (byte 0xff)"),
    ("invalid UTF-8 on a later line", GOOD.encode() + b"# caf\xe9\n",
     "gateway.yaml:7 not UTF-8 text (byte 0xe9)"),
    ("a NUL byte", GOOD.encode() + b"x: \x00\n",
     "gateway.yaml:7 not valid YAML: special characters are not allowed (character #x0000)"),
    ("a self-referencing anchor", b"x: &a [*a]\n",
     "gateway.yaml:1 alias *a is inside its own anchor &a"),
    ("an alias without an anchor", GOOD.encode() + b"metering: *nowhere\n",
     "gateway.yaml:7 alias *nowhere has no anchor &nowhere before it"),
    ("two documents", GOOD.encode() + b"---\nx: 1\n",
     "gateway.yaml:7 more than one YAML document (---) in one file"),
    ("an int tag on a word", GOOD.encode().replace(b"port: 4000", b"port: !!int many"),
     "gateway.yaml:1 cannot read this value as int"),
    ("a timestamp tag on a word", GOOD.encode() + b"metering: !!timestamp soon\n",
     "gateway.yaml:7 cannot read this value as timestamp"),
    ("a Python object tag", GOOD.encode() + b"metering: !!python/object:os.system x\n",
     "gateway.yaml:7 cannot read this value as os.system"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in BAD_BYTES], ids=[c[0] for c in BAD_BYTES]
)
def test_bad_bytes_are_one_error_with_file_and_line(
    data: bytes, expected: str, tmp_path: Path
) -> None:
    assert problems_of(tmp_path, data) == [expected]


def billion_laughs(levels: int, width: int) -> str:
    lines = ['l0: &l0 ["lol"]']
    for n in range(1, levels + 1):
        lines.append(f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_stop_at_the_value_bound_without_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(billion_laughs(levels=9, width=10))  # 10^9 values once expanded
    assert (
        load_in_child(path) == "gateway.yaml:7 more than 1,000,000 values once aliases are expanded"
    )


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, "".join(f"{'  ' * n}k{n}:\n" for n in range(200))],
    ids=["flow", "block"],
)
def test_deep_nesting_is_refused_at_the_depth_bound_without_a_hang(
    text: str, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    assert (
        load_in_child(path)
        == f"gateway.yaml:{1 if text[0] == '[' else MAX_DEPTH + 1} nested deeper than {MAX_DEPTH} levels"
    )


def test_nesting_up_to_the_bound_is_read_and_one_more_level_is_refused(tmp_path: Path) -> None:
    def nested(lists: int) -> bytes:  # the document's mapping is the first level
        return (GOOD + "placeholders: " + "[" * lists + "]" * lists + "\n").encode()

    assert problems_of(tmp_path, nested(MAX_DEPTH - 1)) == [
        "gateway.yaml:7 placeholders[0]: expected a value of visible ASCII characters, no ','"
    ]
    assert problems_of(tmp_path, nested(MAX_DEPTH)) == [
        f"gateway.yaml:7 nested deeper than {MAX_DEPTH} levels"
    ]


def test_a_file_over_the_size_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    with path.open("wb") as out:
        out.write(GOOD.encode())
        out.truncate(MAX_BYTES + 1)  # sparse: the test writes almost nothing
    assert outcome(path).problems == (f"{path}: config is larger than 4 MiB",)  # type: ignore[union-attr]


def test_a_directory_and_a_fifo_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would block until a writer came
    for path in (tmp_path, fifo):
        assert load_in_child(path) == f"{path}: config is not a regular file"


def test_an_unreadable_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(GOOD)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything
        pytest.skip("running as root: permissions do not stop reads")
    assert outcome(path).problems == (f"{path}: cannot read config: Permission denied",)  # type: ignore[union-attr]


def test_an_unclosed_ipv6_upstream_is_a_field_error(tmp_path: Path) -> None:
    text = GOOD.replace("http://127.0.0.1:9000", "'http://[::1'")
    assert problems_of(tmp_path, text.encode()) == [
        "gateway.yaml:5 routes[0].upstream: expected an http:// or https:// URL with a host"
    ]


@pytest.mark.parametrize(
    ("ca_file", "reason"),
    [("missing.pem", "cannot be read: No such file or directory"),
     ("junk.pem", "is not PEM (no -----BEGIN CERTIFICATE----- line)")],
    ids=["missing", "not PEM"],
)  # fmt: skip
def test_an_sso_ca_file_that_cannot_be_used_is_a_field_error_not_an_ssl_exception(
    ca_file: str, reason: str, tmp_path: Path
) -> None:
    (tmp_path / "junk.pem").write_text("junk\n")
    sso = f"sso: {{issuer: 'https://127.0.0.1:1', audiences: [a], ca_file: {ca_file}}}\n"
    assert problems_of(tmp_path, (GOOD + sso).encode()) == [
        f"gateway.yaml:7 sso.ca_file: certificate file {tmp_path / ca_file} {reason}"
    ]


# -- secret and keys files ------------------------------------------------------------------


def test_a_secret_file_over_its_bound_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"sk-" + b"a" * 70_000)
    with pytest.raises(SecretError) as caught:
        read_secret(SecretRef(file=path))
    assert str(caught.value) == f"file {path} is larger than 64 KiB"


def test_a_secret_path_that_is_a_fifo_is_refused_without_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "key")
    code = (
        "import sys; from pathlib import Path\n"
        "from extproc.config.model import SecretRef\n"
        "from extproc.policy.secrets import SecretError, read_secret\n"
        "try:\n    read_secret(SecretRef(file=Path(sys.argv[1])))\n"
        "except SecretError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "key")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.stdout.strip() == f"file {tmp_path / 'key'} is not a regular file"


def test_a_keys_file_over_its_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    with path.open("wb") as out:
        out.truncate(64 * 2**20 + 1)
    with pytest.raises(KeysFileError) as caught:
        read_keys(path)
    assert str(caught.value) == f"keys file {path} is larger than 64 MiB"


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_any_bytes_in_a_keys_file_are_keys_or_a_keys_file_error(folder: Path, data: bytes) -> None:
    path = folder / "keys.txt"
    path.write_bytes(data)
    try:
        read_keys(path)
    except KeysFileError as exc:
        assert str(exc).startswith((f"keys file {path}", f"{path}:"))


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_any_bytes_in_a_secret_file_are_a_secret_or_a_secret_error(
    folder: Path, data: bytes
) -> None:
    path = folder / "secret"
    path.write_bytes(data)
    try:
        secret = read_secret(SecretRef(file=path))
    except SecretError as exc:
        assert str(exc).startswith(f"file {path} ")
    else:
        assert secret is not None and secret.reveal() == data.rstrip(b"\r\n")


# -- properties -----------------------------------------------------------------------------


def check(folder: Path, data: bytes) -> None:
    """The property: a model, or a ConfigError whose every line names the file."""
    path = folder / "gateway.yaml"
    path.write_bytes(data)
    result = outcome(path)
    if isinstance(result, ConfigError):
        assert result.problems
        assert all(p.startswith("gateway.yaml") for p in result.problems), result.problems


FIELDS = [
    "listener", "admin", "extproc", "metrics", "access", "placeholders", "metering", "limits",
    "spend", "routes", "address", "port", "tls", "cert_file", "key_file", "require_access",
    "socket", "failure_mode", "timeout_ms", "workers", "fast_path", "server", "name", "prefix",
    "upstream", "credential", "ca_file", "error_style", "header", "format", "secret", "env",
    "file", "optional", "mode", "client_credentials", "keys_file", "store", "default", "clients",
    "requests_per_minute", "tokens", "token_window", "concurrent", "ca_bundle",
]  # fmt: skip
TRICKY = [
    "http://[::1", "https://[::1]:0", "https://h:99999", "https://x", "http://u@h/?q", "/a/", "/",
    "{secret}", "Bearer {secret}", "gk-x", "127.0.0.1", "::1", "0.0.0.0", "localhost", "memory",
    "redis://h:1/0", "open", "closed", "1d", "0s", "x-api-key", "authorization", "", " ", "é",
    "lean", "grpcio", "client_only", "/dev/zero", ".", "..",
]  # fmt: skip
SNIPPETS = [
    "&a [*a]", "*a", "&a ", "*nope", "[" * 40, "{" * 1100, "[" * 5000, "\x01", "\t", "\x00",
    "---\n", "...\n", ": ", "- ", "? ", "!!binary x", "!!int z", "!!timestamp 2020-99-99",
    "!!python/object:os.system x", "!!set {a}", "!!float q", "'", '"', "#", "%YAML 1.1\n",
    "\ufeff", "\x85", "\u2028", "x: &b [*b, *b]\n", "<<: *a\n", "!!merge", "1" * 5000,
]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(TRICKY),
)  # fmt: skip
KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=6), st.integers(-2, 2), st.none())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)


def _dicts(value: Any) -> list[dict[Any, Any]]:
    found: list[dict[Any, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@st.composite
def near_valid(draw: st.DrawFn) -> Any:
    """The GOOD config with a few fields added, replaced or removed, and values shared."""
    config: Any = yaml.safe_load(GOOD)
    if draw(st.booleans()):
        config["routes"].append(config["routes"][0])  # dumped as an anchor and an alias
    for _ in range(draw(st.integers(0, 5))):
        target = draw(st.sampled_from(_dicts(config)))
        key = draw(st.sampled_from(sorted(target, key=str)) | KEYS) if target else draw(KEYS)
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(VALUES)
    return config


@st.composite
def mutated(draw: st.DrawFn, structures: st.SearchStrategy[Any]) -> bytes:
    """A dumped structure with snippets and raw bytes spliced in at random places."""
    text = yaml.safe_dump(draw(structures), allow_unicode=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=4)) + text[at:]
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
    return data


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    """Deep nesting of either style, or aliases that multiply, beside or inside a config."""
    depth = draw(st.integers(1, 3000))
    kind = draw(st.sampled_from(["flow", "block", "laughs"]))
    if kind == "flow":
        body = "[" * depth + "]" * depth
    elif kind == "block":
        body = "\n" + "".join(
            f"{'  ' * (n + 1)}- \n" if n % 2 else f"{'  ' * (n + 1)}k:\n"
            for n in range(depth % 200)
        )
    else:
        body = "\n" + billion_laughs(draw(st.integers(1, 9)), draw(st.integers(2, 12)))
    where = draw(st.sampled_from(["metering: ", "routes: ", "x: ", ""]))
    return (GOOD + where + body + "\n").encode()


NO_HANG = settings(max_examples=150, deadline=timedelta(seconds=20))


@given(st.binary(max_size=2000))
@NO_HANG
def test_any_bytes_are_a_model_or_a_config_error(folder: Path, data: bytes) -> None:
    check(folder, data)


@given(mutated(VALUES))
@NO_HANG
def test_any_yaml_like_structure_is_a_model_or_a_config_error(folder: Path, data: bytes) -> None:
    check(folder, data)


@given(mutated(near_valid()))
@NO_HANG
def test_a_config_a_few_edits_from_valid_is_a_model_or_a_config_error(
    folder: Path, data: bytes
) -> None:
    check(folder, data)


@given(hostile())
@NO_HANG
def test_deep_and_multiplying_documents_are_a_config_error(folder: Path, data: bytes) -> None:
    check(folder, data)
