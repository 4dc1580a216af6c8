"""Bad YAML files and the exact messages users read: file, line, field path, what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from extproc.config.load import load_config
from extproc.config.sections import ConfigError
from extproc.policy.compiled import compile_policy
from extproc.policy.decision import Outcome

GOOD = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - name: anthropic
    prefix: /anthropic/
    upstream: https://api.anthropic.com
    credential:
      header: x-api-key
      secret: {env: K}
"""
METERED = GOOD + "metering: true\n"


def problems(text: str, folder: Path) -> list[str]:
    path = folder / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return list(caught.value.problems)


CASES = [
    ("secret with both env and file", GOOD.replace("{env: K}", "{env: K, file: /x}"),
     ["gateway.yaml:8 routes[0].credential.secret: give exactly one of env, file"]),
    ("secret with neither", GOOD.replace("{env: K}", "{optional: true}"),
     ["gateway.yaml:8 routes[0].credential.secret: give exactly one of env, file"]),
    ("a typo is an unknown field", GOOD.replace("    prefix:", "    prefx: /a/\n    prefix:"),
     ["gateway.yaml:4 routes[0].prefx: unknown field (allowed: access, ca_file, connect_timeout_s, "
      "credential, error_style, name, prefix, retries, timeout_s, upstream)"]),
    ("duplicate route name and prefix",
     GOOD + "  - name: anthropic\n    prefix: /anthropic/\n    upstream: http://127.0.0.1:1\n",
     ["gateway.yaml:9 routes[1].name: 'anthropic' is already used by routes[0]",
      "gateway.yaml:10 routes[1].prefix: '/anthropic/' is already used by routes[0]"]),
    ("port out of range", GOOD.replace("port: 4000", "port: 70000"),
     ["gateway.yaml:1 listener.port: must be between 1 and 65535, got 70000"]),
    ("upstream not http(s)", GOOD.replace("https://api.anthropic.com", "ftp://x"),
     ["gateway.yaml:5 routes[0].upstream: expected an http:// or https:// URL with a host"]),
    ("format without {secret}", GOOD.replace("header: x-api-key", "header: x-api-key\n      format: Bearer"),
     ["gateway.yaml:8 routes[0].credential.format: must contain {secret} exactly once and no other braces"]),
    ("header with underscore", GOOD.replace("header: x-api-key", "header: x_api_key"),
     ["gateway.yaml:7 routes[0].credential.header: expected a lower-case header name, no '_', "
      "not one Envoy manages (e.g. x-api-key)"]),
    ("a header Envoy manages", GOOD.replace("header: x-api-key", "header: x-envoy-key"),
     ["gateway.yaml:7 routes[0].credential.header: expected a lower-case header name, no '_', "
      "not one Envoy manages (e.g. x-api-key)"]),
    ("no routes", "listener: {address: 127.0.0.1, port: 4000}\n",
     ["gateway.yaml:1 missing required field 'routes'"]),
    ("empty file", "", ["gateway.yaml:1 expected a mapping, got nothing"]),
    ("processor on a public address", GOOD + "extproc: {address: 0.0.0.0}\n",
     ["gateway.yaml:9 extproc.address: must be a loopback address: the processor's answers carry the secret"]),
    ("unknown failure mode", GOOD + "extproc: {failure_mode: sometimes}\n",
     ["gateway.yaml:9 extproc.failure_mode: expected one of closed, open, got 'sometimes'"]),
    ("prefix without slashes", GOOD.replace("/anthropic/", "anthropic"),
     ["gateway.yaml:4 routes[0].prefix: expected path segments of letters, digits, . _ ~ - (e.g. /anthropic)"]),
    ("prefix with a character that is not a path segment's", GOOD.replace("/anthropic/", "/anth(ropic"),
     ["gateway.yaml:4 routes[0].prefix: expected path segments of letters, digits, . _ ~ - (e.g. /anthropic)"]),
    ("prefix with an empty segment", GOOD.replace("/anthropic/", "/a//b"),
     ["gateway.yaml:4 routes[0].prefix: expected path segments of letters, digits, . _ ~ - (e.g. /anthropic)"]),
    ("unknown credential mode", GOOD.replace("secret: {env: K}", "secret: {env: K}\n      mode: sometimes"),
     ["gateway.yaml:9 routes[0].credential.mode: expected one of prefer_client, replace_client, "
      "reject_client, client_only, got 'sometimes'"]),
    ("client_only with a secret", GOOD.replace("secret: {env: K}", "secret: {env: K}\n      mode: client_only"),
     ["gateway.yaml:8 routes[0].credential.secret: a client_only route never uses a server key: "
      "remove the secret"]),
    ("replace_client without a secret", GOOD.replace("secret: {env: K}", "mode: replace_client"),
     ["gateway.yaml:6 routes[0].credential: missing required field 'secret' "
      "(mode replace_client needs a server key)"]),
    ("default mode without a secret", GOOD.replace("      secret: {env: K}\n", ""),
     ["gateway.yaml:6 routes[0].credential: missing required field 'secret' "
      "(mode prefer_client needs a server key)"]),
    ("a placeholder with a comma", GOOD.replace("secret: {env: K}", "secret: {env: K}\n      placeholders: ['a,b']"),
     ["gateway.yaml:9 routes[0].credential.placeholders[0]: expected a value of visible ASCII characters, no ','"]),
    ("a placeholder with a space", GOOD + "placeholders: [dummy, 'no key']\n",
     ["gateway.yaml:9 placeholders[1]: expected a value of visible ASCII characters, no ','"]),
    ("a placeholder that is not text", GOOD + "placeholders: [1]\n",
     ["gateway.yaml:9 placeholders[0]: expected a value of visible ASCII characters, no ','"]),
    ("a placeholder that looks like a gateway key", GOOD + "placeholders: [gk-dummy]\n",
     ["gateway.yaml:9 placeholders[0]: values starting with 'gk-' are gateway keys"]),
    ("access header that is a standard credential slot on a plain route",
     "listener: {address: 127.0.0.1, port: 4000}\nroutes:\n  - name: plain\n    prefix: /p\n"
     "    upstream: https://x\n    access: {keys_file: k, header: x-api-key}\n",
     ["gateway.yaml:6 routes[0].access: header 'x-api-key' is also a client credential header"]),
    ("two parts on one port", GOOD + "admin: {port: 4000}\n",
     ["gateway.yaml:9 admin.port: port 4000 is already used by listener"]),
    ("injected header missing from client_credentials",
     GOOD.replace("secret: {env: K}", "secret: {env: K}\n      client_credentials: [authorization]"),
     ["gateway.yaml:9 routes[0].credential.client_credentials: must include 'x-api-key', "
      "or a client's own would be overwritten"]),
    ("a key given twice", GOOD + "listener: {address: 127.0.0.1, port: 1}\n",
     ["gateway.yaml:9 listener: key given twice"]),
    ("a route that is not a mapping", "listener: {address: 127.0.0.1, port: 4000}\nroutes: [x]\n",
     ["gateway.yaml:2 routes[0]: expected a mapping, got a string"]),
    ("ca_file on plain http",
     GOOD.replace("https://api.anthropic.com", "http://127.0.0.1:8080\n    ca_file: ca.pem"),
     ["gateway.yaml:6 routes[0].ca_file: only applies to an https upstream"]),
    ("not YAML at all", "listener: [\n", ["gateway.yaml:2 not valid YAML: expected the node content, but found '<stream end>'"]),
    ("every problem at once",
     "listener: {address: 127.0.0.1}\nroutes:\n  - name: a b\n    prefix: /a/\n    upstream: https://x\n",
     ["gateway.yaml:1 listener: missing required field 'port'",
      "gateway.yaml:3 routes[0].name: use letters, digits, '.', '_' and '-' (at most 63)"]),
    # limits: (issue 12); METERED adds ``metering: true`` at line 9, so ``limits:`` is line 10
    ("a typo in limits", METERED + "limits: {stor: memory}\n",
     ["gateway.yaml:10 limits.stor: unknown field (allowed: clients, default, on_store_error, password, store, sync_ms)"]),
    ("a typo in the default limit", METERED + "limits:\n  default: {rpm: 5}\n",
     ["gateway.yaml:11 limits.default.rpm: unknown field (allowed: concurrent, requests_per_minute, token_window, tokens)"]),
    ("a typo in a client's limit", METERED + "limits:\n  clients:\n    alice: {requests_per_minut: 5}\n",
     ["gateway.yaml:12 limits.clients.alice.requests_per_minut: unknown field (allowed: concurrent, requests_per_minute, token_window, tokens)"]),
    ("a store that is not redis", METERED + "limits: {store: 'http://127.0.0.1:6379'}\n",
     ["gateway.yaml:10 limits.store: expected memory or redis://host[:port][/db] (rediss:// for TLS)"]),
    ("a store with a three-digit db", METERED + "limits: {store: 'redis://h:6379/100'}\n",
     ["gateway.yaml:10 limits.store: expected memory or redis://host[:port][/db] (rediss:// for TLS)"]),
    ("a store with a space", METERED + "limits: {store: 'redis://h 1'}\n",
     ["gateway.yaml:10 limits.store: expected memory or redis://host[:port][/db] (rediss:// for TLS)"]),
    ("an empty store", METERED + "limits: {store: ''}\n",
     ["gateway.yaml:10 limits.store: expected a non-empty string, got a string"]),
    ("a password for the default memory store", METERED + "limits:\n  password: {env: P}\n",
     ["gateway.yaml:11 limits.password: only a redis store takes a password"]),
    ("a password for a memory store", METERED + "limits:\n  store: memory\n  password: {env: P}\n",
     ["gateway.yaml:12 limits.password: only a redis store takes a password"]),
    ("a password with neither env nor file", METERED + "limits:\n  store: redis://h\n  password: {}\n",
     ["gateway.yaml:12 limits.password: give exactly one of env, file"]),
    ("sync_ms below 20", METERED + "limits: {sync_ms: 19}\n",
     ["gateway.yaml:10 limits.sync_ms: must be between 20 and 10000, got 19"]),
    ("sync_ms above 10000", METERED + "limits: {sync_ms: 10001}\n",
     ["gateway.yaml:10 limits.sync_ms: must be between 20 and 10000, got 10001"]),
    ("an unknown on_store_error", METERED + "limits: {on_store_error: maybe}\n",
     ["gateway.yaml:10 limits.on_store_error: expected one of open, closed, got 'maybe'"]),
    ("a negative requests_per_minute", METERED + "limits:\n  default: {requests_per_minute: -1}\n",
     ["gateway.yaml:11 limits.default.requests_per_minute: must be between 0 and 1000000000000, got -1"]),
    ("tokens above 10**12", METERED + "limits:\n  default: {tokens: 1000000000001}\n",
     ["gateway.yaml:11 limits.default.tokens: must be between 0 and 1000000000000, got 1000000000001"]),
    ("a negative concurrent for a client", METERED + "limits:\n  clients:\n    alice: {concurrent: -2}\n",
     ["gateway.yaml:12 limits.clients.alice.concurrent: must be between 0 and 1000000000000, got -2"]),
    ("a fractional token limit", METERED + "limits:\n  default: {tokens: 5.5}\n",
     ["gateway.yaml:11 limits.default.tokens: expected an integer, got float"]),
    ("a concurrent limit in words", METERED + "limits:\n  default: {concurrent: ten}\n",
     ["gateway.yaml:11 limits.default.concurrent: expected an integer, got a string"]),
    ("a boolean requests_per_minute", METERED + "limits:\n  default: {requests_per_minute: true}\n",
     ["gateway.yaml:11 limits.default.requests_per_minute: expected an integer, got bool"]),
    ("a token_window in weeks", METERED + "limits:\n  default: {token_window: 1w}\n",
     ["gateway.yaml:11 limits.default.token_window: expected a duration like 60s, 30m, 12h or 1d"]),
    ("a token_window of zero", METERED + "limits:\n  default: {token_window: 0s}\n",
     ["gateway.yaml:11 limits.default.token_window: expected a duration like 60s, 30m, 12h or 1d"]),
    ("a token_window without a unit", METERED + "limits:\n  default: {token_window: 5}\n",
     ["gateway.yaml:11 limits.default.token_window: expected a duration like 60s, 30m, 12h or 1d"]),
    ("a token_window of null for a client", METERED + "limits:\n  clients:\n    alice: {token_window: null}\n",
     ["gateway.yaml:12 limits.clients.alice.token_window: expected a duration like 60s, 30m, 12h or 1d"]),
    ("a token_window with eight digits", METERED + "limits:\n  default: {token_window: 10000000s}\n",
     ["gateway.yaml:11 limits.default.token_window: expected a duration like 60s, 30m, 12h or 1d"]),
    ("a client name with a space", METERED + "limits:\n  clients:\n    'bad name': {concurrent: 1}\n",
     ["gateway.yaml:11 limits.clients: 'bad name' is not a client name as in the keys file"]),
    ("a client name that is a number", METERED + "limits:\n  clients:\n    5: {concurrent: 1}\n",
     ["gateway.yaml:11 limits.clients: '5' is not a client name as in the keys file"]),
    ("a client name too long, echoed cut to 64", METERED + f"limits:\n  clients:\n    {'a' * 70}: {{concurrent: 1}}\n",
     [f"gateway.yaml:11 limits.clients: {'a' * 64!r} is not a client name as in the keys file"]),
    ("clients as a list", METERED + "limits:\n  clients: [alice]\n",
     ["gateway.yaml:11 limits.clients: expected a mapping of client names to limits"]),
    ("a client without limits", METERED + "limits:\n  clients:\n    alice:\n",
     ["gateway.yaml:12 limits.clients.alice: expected a mapping, got nothing"]),
    ("limits that are not a mapping", METERED + "limits: 5\n",
     ["gateway.yaml:10 limits: expected a mapping, got int"]),
    ("several workers on a memory store", METERED + "extproc: {workers: 2}\nlimits:\n  default: {concurrent: 1}\n",
     ["gateway.yaml:11 limits.store: with several workers, limits need a shared store (redis://…)"]),
    ("several workers on an explicit memory store", METERED + "extproc: {workers: 2}\nlimits: {store: memory}\n",
     ["gateway.yaml:11 limits.store: with several workers, limits need a shared store (redis://…)"]),
    ("a token limit without metering", GOOD + "limits:\n  default: {tokens: 5}\n",
     ["gateway.yaml:9 limits: token and concurrency limits need metering: true"]),
    ("a client's concurrency limit without metering", GOOD + "limits:\n  clients:\n    bob: {concurrent: 5}\n",
     ["gateway.yaml:9 limits: token and concurrency limits need metering: true"]),
    ("a token limit with metering: false", GOOD + "metering: false\nlimits:\n  default: {tokens: 5}\n",
     ["gateway.yaml:10 limits: token and concurrency limits need metering: true"]),
    ("metering that is not a flag", GOOD + "metering: yes please\n",
     ["gateway.yaml:9 metering: expected true or false, got a string"]),
    ("bad limits of default and clients at once",
     METERED + "limits:\n  default: {tokens: -1}\n  clients:\n    alice: {concurrent: x}\n    'b c': {}\n",
     ["gateway.yaml:11 limits.default.tokens: must be between 0 and 1000000000000, got -1",
      "gateway.yaml:13 limits.clients.alice.concurrent: expected an integer, got a string",
      "gateway.yaml:12 limits.clients: 'b c' is not a client name as in the keys file"]),
    ("a bad client name does not hide the next client's problems",
     METERED + "limits:\n  clients:\n    'b c': {}\n    alice: {concurrent: x}\n",
     ["gateway.yaml:11 limits.clients: 'b c' is not a client name as in the keys file",
      "gateway.yaml:13 limits.clients.alice.concurrent: expected an integer, got a string"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_reported_with_file_line_and_field(
    text: str, expected: list[str], tmp_path: Path
) -> None:
    assert problems(text, tmp_path) == expected


def test_a_pasted_key_is_never_echoed(tmp_path: Path) -> None:
    text = GOOD.replace("{env: K}", "sk-ant-api03-SECRETVALUE")
    found = "\n".join(problems(text, tmp_path))
    assert "SECRETVALUE" not in found
    assert "routes[0].credential.secret: expected a mapping, got a string" in found


def test_a_key_pasted_as_the_variable_name_is_never_echoed(tmp_path: Path) -> None:
    found = problems(GOOD.replace("{env: K}", "{env: sk-ant-api03-PASTED}"), tmp_path)
    assert found == [
        "gateway.yaml:8 routes[0].credential.secret.env: expected an environment variable name "
        "(letters, digits, '_')"
    ]


def test_missing_env_secret_names_the_variable_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as caught:
        compile_policy(load_config(path), environ={})
    assert caught.value.problems == (
        "gateway.yaml:8 routes[0].credential.secret: environment variable K is not set",
    )


def test_unreadable_or_empty_secret_file_names_the_file_not_the_value(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(GOOD.replace("{env: K}", "{file: key}"))
    with pytest.raises(ConfigError) as caught:
        compile_policy(load_config(path), environ={})
    assert caught.value.problems == (
        f"gateway.yaml:8 routes[0].credential.secret: file {secret} is empty",
    )


def test_secret_file_trailing_newline_is_trimmed(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"sk-ant-api03-filekey\r\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(GOOD.replace("{env: K}", "{file: key}"))
    policy = compile_policy(load_config(path), environ={})
    route = next(iter(policy.routes.values()))
    answer = ProcessingResponse.FromString(route.answer(Outcome.INJECTED, (), ""))
    [option] = answer.request_headers.response.header_mutation.set_headers
    assert option.header.raw_value == b"sk-ant-api03-filekey"
    assert "filekey" not in repr(route) and "filekey" not in repr(policy)


def test_optional_secret_missing_starts_and_rejects(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(GOOD.replace("{env: K}", "{env: K, optional: true}"))
    policy = compile_policy(load_config(path), environ={"K": ""})
    assert policy.missing_optional == ("anthropic",)


def test_the_example_config_is_valid_without_any_key() -> None:
    config = load_config(Path(__file__).parents[2] / "examples" / "gateway.yaml")
    assert compile_policy(config, environ={}).missing_optional == ("anthropic", "openai")


def test_a_socket_excludes_address_port_and_workers(tmp_path: Path) -> None:
    both = problems(GOOD + "extproc: {socket: x.sock, port: 50051}\n", tmp_path)
    assert both == ["gateway.yaml:9 extproc.socket: give either socket or address/port, not both"]
    workers = problems(GOOD + "extproc: {socket: x.sock, workers: 2}\n", tmp_path)
    assert workers == [
        "gateway.yaml:9 extproc.workers: several workers need a TCP port (SO_REUSEPORT), not a socket"
    ]
    (tmp_path / "gateway.yaml").write_text(GOOD + "extproc: {socket: x.sock}\n")
    assert load_config(tmp_path / "gateway.yaml").extproc.target == f"unix:{tmp_path}/x.sock"


def test_every_bad_field_of_a_limit_block_is_reported_at_once(tmp_path: Path) -> None:
    text = METERED + "limits:\n  default: {tokens: -1, token_window: 1w}\n"
    assert problems(text, tmp_path) == [
        "gateway.yaml:11 limits.default.tokens: must be between 0 and 1000000000000, got -1",
        "gateway.yaml:11 limits.default.token_window: expected a duration like 60s, 30m, 12h or 1d",
    ]


@pytest.mark.parametrize("url", ["redis://:hunter2@h:6379/0", "redis://h?password=hunter2"])
def test_a_password_in_the_store_url_is_refused(url: str, tmp_path: Path) -> None:
    found = problems(METERED + f"limits: {{store: '{url}'}}\n", tmp_path)
    assert found == [
        "gateway.yaml:10 limits.store: expected memory or redis://host[:port][/db] (rediss:// for TLS)"
    ]
