"""Envoy's CPU per request for people's JWTs and model allowlists, against gateway keys.

Starts the real OpenID provider (oidc-provider), a recording upstream and two real
gateways (Envoy + processor): one with ``sso`` alone, one with ``sso.models``
too (Envoy then reads every JSON body's ``model``). Sends the same requests one
after another on a kept-alive connection, with a gateway key and with a JWT, and
reads Envoy's and the processor's own CPU time (/proc) before and after: CPU
per request, not wall time, so a busy machine changes it little.
``python bench/sso.py [--requests N]`` (``make bench`` runs it too).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(1, str(path))

from harness.gateway import Gateway, credential_route  # noqa: E402
from harness.oidc import OpenIdProvider, Person  # noqa: E402
from harness.upstream import RecordingUpstream  # noqa: E402
from procstat import usage  # noqa: E402

from extproc.policy.access import key_digest  # noqa: E402

AUDIENCE = "https://gateway.bench"
GATEWAY_KEY = "gk-bench-sso-0123456789abcdef0123456789abcdef"
MODEL = "claude-sonnet-4-5"
WARMUP = 100


def body(size: int) -> bytes:
    """A Messages API request of about ``size`` bytes (the prompt makes up the rest)."""
    text = "x" * max(0, size - 120)
    return json.dumps(
        {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
    ).encode()


def cpu_per_request(
    gateway: Gateway, headers: dict[str, str], data: bytes, count: int, upstream: RecordingUpstream
) -> tuple[float, float]:
    """µs of Envoy's and of the processor's CPU per request."""
    assert gateway.envoy_process is not None and gateway.extproc_process is not None
    envoy, processor = gateway.envoy_process.pid, gateway.extproc_process.pid
    connection = http.client.HTTPConnection("127.0.0.1", gateway.listener_port, timeout=30)
    send = {"content-type": "application/json", **headers}

    def run(times: int) -> None:
        for _ in range(times):
            connection.request("POST", "/bench/v1/messages", body=data, headers=send)
            reply = connection.getresponse()
            reply.read()
            assert reply.status == 200, reply.status
        upstream.clear()

    run(WARMUP)
    before = usage(envoy).cpu_s, usage(processor).cpu_s
    run(count)
    after = usage(envoy).cpu_s, usage(processor).cpu_s
    connection.close()
    return tuple((a - b) / count * 1e6 for a, b in zip(after, before, strict=True))  # type: ignore[return-value]


@contextmanager
def gateway_with(
    folder: Path, upstream: RecordingUpstream, provider: OpenIdProvider, models: bool
) -> Iterator[Gateway]:
    keys_file = folder / "keys.txt"
    keys_file.write_text(f"bench sha256:{key_digest(GATEWAY_KEY)}\n")
    sso: dict[str, Any] = {"issuer": provider.issuer, "audiences": [AUDIENCE]}
    if models:
        sso["models"] = {"bench": [MODEL]}
    route = credential_route("bench", upstream.url())
    top = {"access": {"keys_file": str(keys_file)}, "sso": sso}
    with Gateway(folder, [route], env={"BENCH_KEY": "sk-ant-bench"}, top=top) as gateway:
        yield gateway


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        provider = OpenIdProvider(folder, [Person("bench", "bench@example.com", ("bench",))])
        stack.callback(provider.stop)
        provider.start()
        upstream = stack.enter_context(RecordingUpstream("bench-upstream"))
        token = provider.token("bench", AUDIENCE)
        callers = {
            "gateway key (x-api-key)": {"x-api-key": GATEWAY_KEY},
            "JWT (x-api-key)": {"x-api-key": token},
            "JWT (x-api-key + Authorization, as Claude Code)": {
                "x-api-key": token,
                "authorization": f"Bearer {token}",
            },
        }
        print(f"CPU per request, µs ({args.requests} requests each, sequential, kept alive)")
        print(f"{'gateway':<18} {'body':>7}  {'caller':<50} {'Envoy':>7} {'processor':>9}")
        for models in (False, True):
            name = "sso + models" if models else "sso"
            sub = folder / name.replace(" ", "").replace("+", "-")
            sub.mkdir()
            with gateway_with(sub, upstream, provider, models) as gateway:
                for size in (2_000, 100_000):
                    for label, headers in callers.items():
                        envoy, processor = cpu_per_request(
                            gateway, headers, body(size), args.requests, upstream
                        )
                        print(
                            f"{name:<18} {size // 1000:>5}KB  {label:<50} "
                            f"{envoy:>7.0f} {processor:>9.0f}"
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
