"""Typed, error-collecting access to one YAML mapping.

Every getter records a problem (with the field's path and line) instead of
raising, so one run of validation reports every mistake in the file. Getters
return None when the value is unusable; callers build the model only when the
whole file is clean.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from extproc.config.yamlsource import Document, Path_

E = TypeVar("E", bound=Enum)
_MISSING: Any = object()
REQUIRED: Any = _MISSING  # a field without a default: its absence is a problem
# What a field name looks like; any other key is not echoed (it may be a pasted secret).
_FIELD_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,39}$")


@dataclass(frozen=True)
class Problem:
    """One validation error; ``str()`` is the line users read."""

    filename: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f" {self.field}:" if self.field else ""
        return f"{self.filename}:{self.line}{where} {self.message}"


class ConfigError(Exception):
    """A config file (or its secrets) did not validate; carries every problem."""

    def __init__(self, problems: Iterable[Problem | str]) -> None:
        self.problems = tuple(str(p) for p in problems)
        super().__init__("\n".join(self.problems))


def field_name(path: Path_) -> str:
    """``("routes", 0, "credential")`` → ``routes[0].credential``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class Problems:
    """Collects problems against one document."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.items: list[Problem] = []
        for path in doc.duplicate_keys:
            self.add(path, "key given twice")

    def add(self, path: Path_, message: str, shown: Path_ | None = None) -> None:
        """Record ``message`` at ``path``'s line, naming ``shown`` (default: ``path``)."""
        name = field_name(path if shown is None else shown)
        self.items.append(Problem(self.doc.filename, self.doc.line_of(path), name, message))


class Section:
    """One mapping of the YAML, at ``path``, allowed to hold only ``fields``."""

    def __init__(self, problems: Problems, path: Path_, raw: Any, fields: Iterable[str]) -> None:
        self.problems = problems
        self.path = path
        self.raw: dict[Any, Any] = raw if isinstance(raw, dict) else {}
        self.ok = isinstance(raw, dict)
        if not self.ok:
            problems.add(path, f"expected a mapping, got {_kind(raw)}")
        allowed = set(fields)
        for key in self.raw:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                shown = key if _FIELD_LIKE.match(str(key)) else "<key not shown>"
                problems.add((*path, key), f"unknown field (allowed: {hint})", (*path, shown))

    def has(self, key: str) -> bool:
        return key in self.raw

    def error(self, key: str | None, message: str) -> None:
        self.problems.add(self.path if key is None else (*self.path, key), message)

    def _get(self, key: str, default: Any) -> Any:
        if key in self.raw:
            return self.raw[key]
        if default is _MISSING:
            self.error(None, f"missing required field {key!r}")
            return None  # reported: the part is not built
        return default

    def text(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if key in self.raw and (not isinstance(value, str) or not value):
            self.error(key, f"expected a non-empty string, got {_kind(value)}")
            return None
        return value

    def integer(self, key: str, default: Any = _MISSING, low: int = 0, high: int = 2**31) -> Any:
        value = self._get(key, default)
        if key not in self.raw:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"expected an integer, got {_kind(value)}")
            return None
        if not low <= value <= high:
            self.error(key, f"must be between {low} and {high}, got {value}")
            return None
        return value

    def flag(self, key: str, default: bool) -> Any:
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.error(key, f"expected true or false, got {_kind(value)}")
            return None
        return value

    def choice(self, key: str, kind: type[E], default: E) -> E | None:
        value = self._get(key, default)
        if isinstance(value, kind):
            return value
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in kind)
            shown = repr(value) if _FIELD_LIKE.match(str(value)) else _kind(value)
            self.error(key, f"expected one of {choices}, got {shown}")
            return None

    def section(self, key: str, fields: Iterable[str], required: bool = False) -> Section | None:
        if key not in self.raw:
            if required and self.ok:  # a non-mapping was reported already
                self.error(None, f"missing required field {key!r}")
            return None
        return Section(self.problems, (*self.path, key), self.raw[key], fields)

    def items(self, key: str) -> list[tuple[Path_, Any]]:
        """A list field as (path, item) pairs; empty (with a problem) if not a list."""
        value = self.raw.get(key, [])
        if not isinstance(value, list):
            self.error(key, f"expected a list, got {_kind(value)}")
            return []
        return [((*self.path, key, i), item) for i, item in enumerate(value)]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "a string"  # never echo text: a pasted key must not reach a log
    return type(value).__name__
