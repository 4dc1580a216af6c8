"""A real OpenID provider (npm ``oidc-provider``, pinned in package.json) on a free port.

``OpenIdProvider`` starts ``tests/harness/oidc_provider.mjs`` with a test
configuration (clients for the client-credentials grant, each with an email,
groups and a token lifetime), waits for its discovery document, and gets real
access tokens (RS256 JWTs whose audience is the requested resource). Its
signing keys live in a file, so ``rotate()`` restarts it with a new key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode, urlsafe_b64encode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.gateway import ROOT
from harness.ports import free_port

SCRIPT = ROOT / "tests" / "harness" / "oidc_provider.mjs"
READY_DEADLINE_S = 30.0
NODE = shutil.which("node") or "/usr/bin/node"  # Node.js 20 runs oidc-provider 8.x


@dataclass(frozen=True)
class Person:
    client_id: str
    email: str
    groups: tuple[str, ...] = ()
    ttl: int = 600
    secret: str = field(default="")

    def as_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_secret": self.secret or f"secret-of-{self.client_id}-0123456789abcdef",
            "email": self.email,
            "groups": list(self.groups),
            "ttl": self.ttl,
        }


class OpenIdProvider:
    def __init__(self, folder: Path, people: list[Person]) -> None:
        self.folder = folder
        self.people = {p.client_id: p.as_json() for p in people}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.config_file = folder / "oidc.json"
        self.keys_file = folder / "oidc-keys.json"

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def secret_of(self, client_id: str) -> str:
        return str(self.people[client_id]["client_secret"])

    def start(self) -> OpenIdProvider:
        config = {"clients": list(self.people.values()), "keys_file": str(self.keys_file)}
        self.config_file.write_text(json.dumps(config))
        with (self.folder / "oidc.log").open("ab") as log:
            self.process = subprocess.Popen(
                [NODE, str(SCRIPT), str(self.port), str(self.config_file)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={"PATH": os.environ["PATH"]},
            )  # fmt: skip
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        end = time.monotonic() + READY_DEADLINE_S
        url = self.issuer + "/.well-known/openid-configuration"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError("oidc-provider exited: " + self.logs())
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                if time.monotonic() > end:
                    raise AssertionError("oidc-provider not ready: " + self.logs()) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def rotate(self) -> None:
        """A new signing key (the old one retired): a restart on the same port, fresh keys."""
        self.stop()
        self.keys_file.unlink(missing_ok=True)
        self.start()

    def logs(self) -> str:
        path = self.folder / "oidc.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def forge(self, claims: dict[str, Any]) -> str:
        """A JWT with ``claims`` signed by the provider's own current key (RS256, its kid):
        for claims the provider never issues, such as a ``nbf`` in the future."""
        jwk = json.loads(self.keys_file.read_text())["keys"][0]
        header = {"alg": "RS256", "typ": "at+jwt", "kid": jwk["kid"]}
        signed = ".".join(_b64(json.dumps(part).encode()) for part in (header, claims))
        script = (
            "const c = require('node:crypto'); const [jwk, data] = process.argv.slice(1);"
            "const key = c.createPrivateKey({key: JSON.parse(jwk), format: 'jwk'});"
            "process.stdout.write(c.sign('sha256', Buffer.from(data), key).toString('base64url'));"
        )
        done = subprocess.run(
            [NODE, "-e", script, json.dumps(jwk), signed],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return f"{signed}.{done.stdout}"

    def token(self, client_id: str, resource: str) -> str:
        """A real access token by the client-credentials grant."""
        basic = b64encode(f"{client_id}:{self.secret_of(client_id)}".encode()).decode()
        body = urllib.parse.urlencode(
            {"grant_type": "client_credentials", "resource": resource, "scope": "api"}
        ).encode()
        request = urllib.request.Request(
            self.issuer + "/token", data=body, headers={"authorization": f"Basic {basic}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return str(json.loads(reply.read())["access_token"])


def _b64(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()
