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
    # bounds: one past each end is refused (tests/unit/test_config_strength.py accepts each end)
    ("max_connections below 4", GOOD + "extproc: {max_connections: 3}\n",
     ["gateway.yaml:9 extproc.max_connections: must be between 4 and 100000, got 3"]),
    ("max_connections above 100000", GOOD + "extproc: {max_connections: 100001}\n",
     ["gateway.yaml:9 extproc.max_connections: must be between 4 and 100000, got 100001"]),
    ("idle_timeout_s below 10", GOOD + "extproc: {idle_timeout_s: 9}\n",
     ["gateway.yaml:9 extproc.idle_timeout_s: must be between 10 and 86400, got 9"]),
    ("idle_timeout_s above a day", GOOD + "extproc: {idle_timeout_s: 86401}\n",
     ["gateway.yaml:9 extproc.idle_timeout_s: must be between 10 and 86400, got 86401"]),
    ("memory_budget_mb below 4", GOOD + "extproc: {memory_budget_mb: 3}\n",
     ["gateway.yaml:9 extproc.memory_budget_mb: must be between 4 and 16384, got 3"]),
    ("memory_budget_mb above 16384", GOOD + "extproc: {memory_budget_mb: 16385}\n",
     ["gateway.yaml:9 extproc.memory_budget_mb: must be between 4 and 16384, got 16385"]),
    ("timeout_ms of zero", GOOD + "extproc: {timeout_ms: 0}\n",
     ["gateway.yaml:9 extproc.timeout_ms: must be between 1 and 60000, got 0"]),
    ("timeout_ms above a minute", GOOD + "extproc: {timeout_ms: 60001}\n",
     ["gateway.yaml:9 extproc.timeout_ms: must be between 1 and 60000, got 60001"]),
    ("no workers", GOOD + "extproc: {workers: 0}\n",
     ["gateway.yaml:9 extproc.workers: must be between 1 and 64, got 0"]),
    ("65 workers", GOOD + "extproc: {workers: 65}\n",
     ["gateway.yaml:9 extproc.workers: must be between 1 and 64, got 65"]),
    ("stream_idle_timeout_s of zero", GOOD.replace("port: 4000", "port: 4000, stream_idle_timeout_s: 0"),
     ["gateway.yaml:1 listener.stream_idle_timeout_s: must be between 1 and 86400, got 0"]),
    ("stream_idle_timeout_s above a day", GOOD.replace("port: 4000", "port: 4000, stream_idle_timeout_s: 86401"),
     ["gateway.yaml:1 listener.stream_idle_timeout_s: must be between 1 and 86400, got 86401"]),
    ("max_request_headers_kb of zero", GOOD.replace("port: 4000", "port: 4000, max_request_headers_kb: 0"),
     ["gateway.yaml:1 listener.max_request_headers_kb: must be between 1 and 8192, got 0"]),
    ("max_request_headers_kb above 8192", GOOD.replace("port: 4000", "port: 4000, max_request_headers_kb: 8193"),
     ["gateway.yaml:1 listener.max_request_headers_kb: must be between 1 and 8192, got 8193"]),
    ("a negative route timeout", GOOD.replace("    credential:", "    timeout_s: -1\n    credential:"),
     ["gateway.yaml:6 routes[0].timeout_s: must be between 0 and 86400, got -1"]),
    ("a route timeout above a day", GOOD.replace("    credential:", "    timeout_s: 86401\n    credential:"),
     ["gateway.yaml:6 routes[0].timeout_s: must be between 0 and 86400, got 86401"]),
    ("a connect timeout of zero", GOOD.replace("    credential:", "    connect_timeout_s: 0\n    credential:"),
     ["gateway.yaml:6 routes[0].connect_timeout_s: must be between 1 and 300, got 0"]),
    ("a connect timeout above 300", GOOD.replace("    credential:", "    connect_timeout_s: 301\n    credential:"),
     ["gateway.yaml:6 routes[0].connect_timeout_s: must be between 1 and 300, got 301"]),
    ("negative retries", GOOD.replace("    credential:", "    retries: -1\n    credential:"),
     ["gateway.yaml:6 routes[0].retries: must be between 0 and 10, got -1"]),
    ("eleven retries", GOOD.replace("    credential:", "    retries: 11\n    credential:"),
     ["gateway.yaml:6 routes[0].retries: must be between 0 and 10, got 11"]),
    # the structure around the routes
    ("no listener", GOOD.replace("listener: {address: 127.0.0.1, port: 4000}\n", ""),
     ["gateway.yaml:1 missing required field 'listener'"]),
    ("an empty route list", "listener: {address: 127.0.0.1, port: 4000}\nroutes: []\n",
     ["gateway.yaml:2 routes: give at least one route"]),
    ("a TLS certificate that is a number", GOOD.replace("port: 4000", "port: 4000, tls: {cert_file: 5, key_file: k.pem}"),
     ["gateway.yaml:1 listener.tls.cert_file: expected a non-empty string, got int"]),
    ("a TLS key that is empty", GOOD.replace("port: 4000", "port: 4000, tls: {cert_file: c.pem, key_file: ''}"),
     ["gateway.yaml:1 listener.tls.key_file: expected a non-empty string, got a string"]),
    ("the processor on the listener's port", GOOD + "extproc: {port: 4000}\n",
     ["gateway.yaml:9 extproc.port: port 4000 is already used by listener"]),
    ("metrics on the listener's port", GOOD + "metrics: {port: 4000}\n",
     ["gateway.yaml:9 metrics.port: port 4000 is already used by listener"]),
    ("metrics on the listener's port with the processor on a socket",
     GOOD + "extproc: {socket: x.sock}\nmetrics: {port: 4000}\n",
     ["gateway.yaml:10 metrics.port: port 4000 is already used by listener"]),
    ("a socket and an address", GOOD + "extproc: {socket: x.sock, address: 127.0.0.1}\n",
     ["gateway.yaml:9 extproc.socket: give either socket or address/port, not both"]),
    ("a duplicate after a broken route is still found",
     "listener: {address: 127.0.0.1, port: 4000}\nroutes:\n  - name: a b\n    prefix: /x\n    upstream: http://h\n"
     "  - {name: a, prefix: /a, upstream: 'http://h'}\n  - {name: a, prefix: /b, upstream: 'http://h'}\n",
     ["gateway.yaml:3 routes[0].name: use letters, digits, '.', '_' and '-' (at most 63)",
      "gateway.yaml:7 routes[2].name: 'a' is already used by routes[1]"]),
    # a part with problems is not checked further: one mistake, one message
    ("a route with broken placeholders is not also a duplicate",
     GOOD + "  - name: anthropic\n    prefix: /other\n    upstream: https://x\n    credential: {header: x-api-key, secret: {env: K}, placeholders: [gk-x]}\n",
     ["gateway.yaml:12 routes[1].credential.placeholders[0]: values starting with 'gk-' are gateway keys"]),
    ("a route whose access header is a credential slot is not also a duplicate",
     GOOD + "  - name: anthropic\n    prefix: /other\n    upstream: https://x\n    access: {keys_file: k, header: authorization}\n",
     ["gateway.yaml:12 routes[1].access: header 'authorization' is also a client credential header"]),
    ("an admin address that is not text is not also a port clash", GOOD + "admin: {address: 5, port: 4000}\n",
     ["gateway.yaml:9 admin.address: expected a non-empty string, got int"]),
    ("a listener with a bad setting is not also a port clash",
     GOOD.replace("port: 4000", "port: 4000, max_request_headers_kb: 0") + "admin: {port: 4000}\n",
     ["gateway.yaml:1 listener.max_request_headers_kb: must be between 1 and 8192, got 0"]),
    ("a listener with bad TLS files is not also a port clash",
     GOOD.replace("port: 4000", "port: 4000, tls: {cert_file: 5, key_file: k.pem}") + "admin: {port: 4000}\n",
     ["gateway.yaml:1 listener.tls.cert_file: expected a non-empty string, got int"]),
    ("a processor on a public address is not also a port clash", GOOD + "extproc: {address: 0.0.0.0, port: 4000}\n",
     ["gateway.yaml:9 extproc.address: must be a loopback address: the processor's answers carry the secret"]),
    ("a route with a broken credential is not also a duplicate",
     GOOD + "  - name: anthropic\n    prefix: /other\n    upstream: https://x\n    credential: {header: x-api-key, format: Bearer, secret: {env: K}}\n",
     ["gateway.yaml:12 routes[1].credential.format: must contain {secret} exactly once and no other braces"]),
    ("a route with a broken access block is not also an open relay",
     GOOD.replace("127.0.0.1, port: 4000", "0.0.0.0, port: 4000, require_access: true").replace(
         "    credential:", "    access: {header: x-gk}\n    credential:"),
     ["gateway.yaml:6 routes[0].access: missing required field 'keys_file'"]),
    # access, upstream and credential details
    ("access without a keys file", GOOD + "access: {header: x-gk}\n",
     ["gateway.yaml:9 access: missing required field 'keys_file'"]),
    ("an access header with an underscore", GOOD + "access: {keys_file: k, header: x_gk}\n",
     ["gateway.yaml:9 access.header: expected a lower-case header name, no '_', not one Envoy manages (e.g. x-gateway-key)"]),
    ("an access header that is one of the route's client credential headers",
     GOOD.replace("secret: {env: K}", "secret: {env: K}\n      client_credentials: [x-api-key, x-custom]")
     + "access: {keys_file: k, header: x-custom}\n",
     ["gateway.yaml:3 routes[0].access: header 'x-custom' is also a client credential header"]),
    ("an upstream port out of range", GOOD.replace("api.anthropic.com", "api.anthropic.com:99999"),
     ["gateway.yaml:5 routes[0].upstream: expected an http:// or https:// URL with a host"]),
    ("an upstream with a query", GOOD.replace("api.anthropic.com", "api.anthropic.com/?a=1"),
     ["gateway.yaml:5 routes[0].upstream: give scheme, host, optional port and path only"]),
    ("an upstream with a user", GOOD.replace("api.anthropic.com", "me@api.anthropic.com"),
     ["gateway.yaml:5 routes[0].upstream: give scheme, host, optional port and path only"]),
    ("an upstream with a fragment", GOOD.replace("api.anthropic.com", "api.anthropic.com/#top"),
     ["gateway.yaml:5 routes[0].upstream: give scheme, host, optional port and path only"]),
    ("a format with a stray opening brace", GOOD.replace("header: x-api-key", "header: x-api-key\n      format: '{secret}{'"),
     ["gateway.yaml:8 routes[0].credential.format: must contain {secret} exactly once and no other braces"]),
    ("a client credential header with an underscore",
     GOOD.replace("secret: {env: K}", "secret: {env: K}\n      client_credentials: [x-api-key, x_key]"),
     ["gateway.yaml:9 routes[0].credential.client_credentials[1]: expected a header name"]),
    ("a client credential header that is not text",
     GOOD.replace("secret: {env: K}", "secret: {env: K}\n      client_credentials: [5]"),
     ["gateway.yaml:9 routes[0].credential.client_credentials[0]: expected a header name"]),
    ("no client credential headers",
     GOOD.replace("secret: {env: K}", "secret: {env: K}\n      client_credentials: []"),
     ["gateway.yaml:9 routes[0].credential.client_credentials: give at least one header name"]),
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


def test_a_key_pasted_as_a_field_name_is_never_echoed(tmp_path: Path) -> None:
    pasted = "sk-ant-api03-" + "PASTEDKEY" * 8
    found = problems(GOOD.replace("{env: K}", "{env: K, " + pasted + ": x}"), tmp_path)
    assert found == [
        "gateway.yaml:8 routes[0].credential.secret.<key not shown>: unknown field "
        "(allowed: env, file, optional)"
    ]


def test_a_key_pasted_as_a_choice_is_never_echoed(tmp_path: Path) -> None:
    pasted = "sk-ant-api03-" + "PASTEDKEY" * 8
    found = problems(GOOD + "extproc: {failure_mode: " + pasted + "}\n", tmp_path)
    assert found == [
        "gateway.yaml:9 extproc.failure_mode: expected one of closed, open, got a string"
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


def test_an_unreadable_config_names_the_file_and_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == (f"{path}: cannot read config: No such file or directory",)


# A required field left out of a nested mapping crashes the load (TypeError/AttributeError)
# instead of being reported: ``Section.text(key)`` records "missing required field" but
# returns its ``_MISSING`` sentinel, a truthy object that load.py then uses as a string.
MISSING_REQUIRED = [
    ("a route without a name", "  - {prefix: /a, upstream: 'http://h'}\n",
     "gateway.yaml:3 routes[0]: missing required field 'name'"),
    ("a route without a prefix", "  - {name: a, upstream: 'http://h'}\n",
     "gateway.yaml:3 routes[0]: missing required field 'prefix'"),
    ("a route without an upstream", "  - {name: a, prefix: /a}\n",
     "gateway.yaml:3 routes[0]: missing required field 'upstream'"),
    ("a credential without a header", "  - {name: a, prefix: /a, upstream: 'http://h', credential: {secret: {env: K}}}\n",
     "gateway.yaml:3 routes[0].credential: missing required field 'header'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "expected"), [m[1:] for m in MISSING_REQUIRED], ids=[m[0] for m in MISSING_REQUIRED]
)
def test_a_missing_required_field_of_a_route_is_reported(
    route: str, expected: str, tmp_path: Path
) -> None:
    text = "listener: {address: 127.0.0.1, port: 4000}\nroutes:\n" + route
    assert problems(text, tmp_path) == [expected]


@pytest.mark.parametrize("given", ["cert_file: c.pem", "key_file: k.pem"])
def test_a_tls_listener_missing_one_of_its_files_is_reported(given: str, tmp_path: Path) -> None:
    missing = "key_file" if given.startswith("cert") else "cert_file"
    text = GOOD.replace("port: 4000", f"port: 4000, tls: {{{given}}}")
    assert problems(text, tmp_path) == [
        f"gateway.yaml:1 listener.tls: missing required field '{missing}'"
    ]


def test_a_format_with_a_stray_closing_brace_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("header: x-api-key", "header: x-api-key\n      format: '{secret}}'")
    assert problems(text, tmp_path) == [
        "gateway.yaml:8 routes[0].credential.format: must contain {secret} exactly once and no other braces"
    ]


@pytest.mark.parametrize(
    "access",
    ["{keys_file: k, header: x_gk}", "{header: x-gk}", "{keys_file: k, for_client_credentials: 1}"],
    ids=["a bad header", "no keys file", "a flag that is not a flag"],
)
def test_a_broken_default_access_block_is_not_also_an_open_relay(
    access: str, tmp_path: Path
) -> None:
    text = GOOD.replace("127.0.0.1, port: 4000", "0.0.0.0, port: 4000, require_access: true")
    found = problems(text + f"access: {access}\n", tmp_path)
    assert len(found) == 1 and found[0].startswith("gateway.yaml:9 access")
