"""Read secrets named by the config, wrapped in a type that never prints itself.

A ``Secret`` is created the moment a value is read; its ``repr``/``str`` are
``[redacted]``, so a secret cannot reach a log line, an exception message or a
golden file by accident. Error messages name the variable or file, never the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from extproc.config.files import FileProblem, read_bounded
from extproc.config.model import SecretRef

MAX_SECRET_BYTES = 64 * 2**10  # a header value; Envoy refuses request headers over 60 KiB


class Secret:
    """A secret value; only ``reveal()`` gives the bytes, for the one header that needs them."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret([redacted])"

    __str__ = __repr__


class SecretError(Exception):
    """A secret could not be read; the message names its source only."""


def read_secret(ref: SecretRef, environ: Mapping[str, str] = os.environ) -> Secret | None:
    """The secret ``ref`` points at; None when it is absent and ``optional``.

    Raises SecretError for a required secret that is missing, and for any
    secret that is present but unusable (empty, unreadable, with line breaks).
    """
    raw = _read_env(ref, environ) if ref.env else _read_file(ref)
    # An empty file is as unset as `VAR=`: compose writes one for an unset variable.
    if raw is None or (ref.optional and not raw.strip()):
        if ref.optional:
            return None
        raise SecretError(f"{ref.describe()} {'is not set' if ref.env else 'does not exist'}")
    value = raw.rstrip(b"\r\n")
    if not value.strip():
        raise SecretError(f"{ref.describe()} is empty")
    if any(byte < 0x20 or byte == 0x7F for byte in value):
        raise SecretError(f"{ref.describe()} contains a line break or control character")
    return Secret(value)


def _read_env(ref: SecretRef, environ: Mapping[str, str]) -> bytes | None:
    assert ref.env is not None
    value = environ.get(ref.env)
    return os.fsencode(value) if value else None  # `VAR=` in a shell means "unset"


def _read_file(ref: SecretRef) -> bytes | None:
    assert ref.file is not None
    path: Path = ref.file
    try:
        return read_bounded(path, MAX_SECRET_BYTES, "secret file")
    except FileProblem as exc:  # a directory, /dev/zero, a FIFO: never a hang or a traceback
        if exc.missing:
            return None
        raise SecretError(f"{ref.describe()} {exc.reason}") from None
