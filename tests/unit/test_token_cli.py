"""The token helper's client secret goes to the token endpoint only: never to where it
redirects, never over plain http to another host."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from extproc.token_cli import TokenError, _secret, fetch


class _Recorder(BaseHTTPRequestHandler):
    """Answers 302 to ``server.redirect`` if set, else a token; records what it got."""

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.seen.append(dict(self.headers))  # type: ignore[attr-defined]
        target = self.server.redirect  # type: ignore[attr-defined]
        if target:
            self.send_response(302)  # urllib follows it, as a GET
            self.send_header("location", target)
            self.end_headers()
            return
        body = b'{"access_token": "tok", "expires_in": 60}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(host: str, redirect: str = "") -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    server.redirect = redirect  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def other_host() -> Iterator[ThreadingHTTPServer]:
    server = _serve("127.0.0.2")
    yield server
    server.shutdown()


def test_a_redirect_never_carries_the_client_secret(other_host: ThreadingHTTPServer) -> None:
    elsewhere = f"http://127.0.0.2:{other_host.server_address[1]}/token"
    endpoint = _serve("127.0.0.1", redirect=elsewhere)
    try:
        url = f"http://127.0.0.1:{endpoint.server_address[1]}/token"
        assert fetch(url, "cid", "s3cret", "aud", "")[0] == "tok"
    finally:
        endpoint.shutdown()
    assert "Authorization" in endpoint.seen[0]  # type: ignore[attr-defined]
    assert other_host.seen and all(  # type: ignore[attr-defined]
        "Authorization" not in h and "authorization" not in h
        for h in other_host.seen  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize("url", ["http://idp.example.com/token", "ftp://127.0.0.1/token"])
def test_plain_http_is_refused_except_to_loopback(url: str) -> None:
    with pytest.raises(TokenError, match="expected an https URL"):
        fetch(url, "cid", "s3cret", "aud", "")


def test_a_secret_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"\xff\xfe-secret")
    args = type("Args", (), {"secret_env": None, "secret_file": secret})()
    with pytest.raises(TokenError, match="not UTF-8") as caught:
        _secret(args)  # type: ignore[arg-type]
    assert "secret" not in str(caught.value).replace("secret file", "").replace(str(secret), "")
