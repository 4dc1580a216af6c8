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
