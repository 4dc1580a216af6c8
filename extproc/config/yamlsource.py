"""Read YAML into plain values while remembering the line of every field, within bounds.

Validation errors must name the file, the line and the field path, so the
loader keeps a map from field path (``("routes", 0, "credential")``) to the
1-based line where that key or item starts.

Values are built from PyYAML's event stream by one loop with an explicit
stack (no recursion, so no depth can overflow the interpreter's stack), and
every way a file can be hostile is bounded here, each with a message that
names the file and line: at most ``MAX_BYTES`` of UTF-8 text, ``MAX_DEPTH``
levels of nesting, ``MAX_VALUES`` values once aliases are expanded (so a
"billion laughs" file stops early), and no alias inside its own anchor.
Whatever the bytes, the result is a ``Document`` or a ``SourceError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.reader import ReaderError

from extproc.config.files import FileProblem, read_bounded

# libyaml's parser when PyYAML has it (about 10x faster for large files); same events and marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR = "tag:yaml.org,2002:str"

MAX_BYTES = 4 * 2**20  # about 13,000 routes
MAX_DEPTH = 32  # the schema needs 6
MAX_VALUES = 1_000_000  # scalars and collections, each alias counted as what it repeats
_EXPLAIN_CHARS = 256 * 2**10

Path_ = tuple[str | int, ...]


class SourceError(Exception):
    """The file cannot be read as YAML; ``str()`` names the file (and line, when there is one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class Document:
    """A parsed YAML document: plain data plus a field-path → line index."""

    filename: str
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    duplicate_keys: tuple[Path_, ...] = ()
    digest: str = ""  # sha256 of the text parsed, so versions name exactly what was loaded

    def line_of(self, path: Path_) -> int:
        """The line of ``path``, or of its nearest ancestor that exists."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1


def load(path: Path) -> Document:
    """Parse the file at ``path``; raise SourceError for anything that is not a usable config."""
    try:
        data = read_bounded(path, MAX_BYTES, "config")
    except FileProblem as exc:
        raise SourceError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start]
        raise SourceError(f"{path.name}:{line} not UTF-8 text (byte 0x{byte:02x})") from None
    return loads(text, path.name)


def loads(text: str, filename: str) -> Document:
    """Parse YAML text that came from ``filename`` (used in messages only)."""
    try:
        builder = _build(text, filename, _LOADER)
    except yaml.YAMLError as exc:
        raise _explain(text, filename, exc) from None
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Document(filename, builder.root, builder.lines, tuple(builder.duplicates), digest)


def _build(text: str, filename: str, loader: type[Any]) -> _Builder:
    builder = _Builder(filename)
    for event in yaml.parse(text, Loader=loader):
        builder.take(event)
    return builder


def _explain(text: str, filename: str, first: yaml.YAMLError) -> SourceError:
    """The error worded by the pure-Python parser (libyaml's is terse), with its line.

    The second pass goes through the same bounds, so it stops where they would
    (libyaml refuses 1,000 levels of nesting; the pure-Python parser has no limit).
    A large file keeps libyaml's words: the pure-Python parser reads about 200 KiB/s.
    """
    found = first
    try:
        if len(text) <= _EXPLAIN_CHARS:
            _build(text, filename, yaml.SafeLoader)
    except yaml.YAMLError as exc:
        found = exc
    if isinstance(found, ReaderError):
        line = text.count("\n", 0, found.position) + 1
        reason = f"{found.reason} (character #x{found.character:04x})"
        return SourceError(f"{filename}:{line} not valid YAML: {reason}")
    if isinstance(found, yaml.MarkedYAMLError):
        mark = found.problem_mark or found.context_mark
        line = mark.line + 1 if mark is not None else 1
        return SourceError(f"{filename}:{line} not valid YAML: {found.problem or found.context}")
    return SourceError(f"{filename}: not valid YAML")  # no other kind has a place to name


@dataclass
class _Open:
    """A mapping or sequence whose end event has not come yet."""

    value: dict[Any, Any] | list[Any]
    path: Path_
    anchor: str | None
    first: int  # the value count when it opened, so its size is known at its end
    key: Any = None
    has_key: bool = False
    as_key: bool = False  # the collection is itself a mapping key (``? [a]: b``)


class _Builder:
    """Turns parser events into plain values, recording each path's line on the way."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[Path_, int] = {}
        self.duplicates: list[Path_] = []
        self.root: Any = None
        self._stack: list[_Open] = []
        self._anchors: dict[str, tuple[Any, int]] = {}  # finished anchors: value, size
        self._values = 0
        self._documents = 0
        self._loader = yaml.SafeLoader("")  # resolves and constructs scalars as safe_load does
        self._resolve: Callable[..., str] = self._loader.resolve  # untyped in PyYAML's stubs

    def take(self, event: yaml.Event) -> None:
        line = event.start_mark.line + 1 if event.start_mark else 1
        if isinstance(event, yaml.DocumentStartEvent):
            self._documents += 1
            if self._documents > 1:
                self._fail(line, "more than one YAML document (---) in one file")
        elif isinstance(event, yaml.ScalarEvent):
            self._count(1, line)
            self._deliver(self._scalar(event, line), line, event.anchor, 1)
        elif isinstance(event, yaml.AliasEvent):
            self._deliver(self._alias(event.anchor or "", line), line, None, 0)
        elif isinstance(event, yaml.CollectionStartEvent):
            self._open(event, line)
        elif isinstance(event, yaml.CollectionEndEvent):
            done = self._stack.pop()
            size = self._values - done.first
            value = f"<{type(done.value).__name__}>" if done.as_key else done.value
            self._deliver(value, line, done.anchor, size, opened=True)

    def _open(self, event: yaml.CollectionStartEvent, line: int) -> None:
        if len(self._stack) >= MAX_DEPTH:
            self._fail(line, f"nested deeper than {MAX_DEPTH} levels")
        self._count(1, line)
        top = self._stack[-1] if self._stack else None
        as_key = top is not None and isinstance(top.value, dict) and not top.has_key
        # A collection used as a key gets a path no field can have: its lines stay apart.
        path = (*self._path_here(), "<key>") if as_key else self._path_here()
        self.lines.setdefault(path, line)
        value: dict[Any, Any] | list[Any] = {} if isinstance(event, yaml.MappingStartEvent) else []
        self._stack.append(_Open(value, path, event.anchor, self._values, as_key=as_key))

    def _path_here(self) -> Path_:
        """The path of the value that comes next."""
        if not self._stack:
            return ()
        top = self._stack[-1]
        if isinstance(top.value, list):
            return (*top.path, len(top.value))
        return (*top.path, top.key) if top.has_key else top.path

    def _deliver(
        self, value: Any, line: int, anchor: str | None, size: int, opened: bool = False
    ) -> None:
        """Place a finished value in the collection that is open (or make it the root)."""
        if anchor is not None:
            self._anchors[anchor] = (value, size)
        if not self._stack:
            self.root = value
            self.lines.setdefault((), line)
            return
        top = self._stack[-1]
        if isinstance(top.value, list):
            if not opened:
                self.lines.setdefault((*top.path, len(top.value)), line)
            top.value.append(value)
        elif not top.has_key:
            key = value if _hashable(value) else f"<{type(value).__name__}>"
            if key in top.value:
                self.duplicates.append((*top.path, key))
            self.lines[(*top.path, key)] = line
            top.key, top.has_key = key, True
        else:
            top.value[top.key] = value
            top.key, top.has_key = None, False

    def _scalar(self, event: yaml.ScalarEvent, line: int) -> Any:
        """A scalar resolved the way safe_load would (ints, bools, null, strings)."""
        tag = event.tag
        if tag is None or tag == "!":
            tag = self._resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _STR:
            return event.value
        node = yaml.ScalarNode(tag, event.value, None, None, event.style)
        try:
            return self._loader.construct_object(node, deep=True)
        # The constructors are PyYAML's: a bad ``!!int``, ``!!timestamp`` or ``!!binary`` ends
        # in whatever its code raises (ValueError, AttributeError, ConstructorError...). Any of
        # them means this one value cannot be read, which is the file's fault, not a bug here.
        except Exception:
            self._fail(line, f"cannot read this value as {tag.rsplit(':', 1)[-1]}")
        finally:
            self._loader.constructed_objects.clear()

    def _alias(self, name: str, line: int) -> Any:
        found = self._anchors.get(name)
        if found is None:
            if any(open_.anchor == name for open_ in self._stack):
                self._fail(line, f"alias *{name} is inside its own anchor &{name}")
            self._fail(line, f"alias *{name} has no anchor &{name} before it")
        value, size = found
        self._count(size, line)
        return value

    def _count(self, size: int, line: int) -> None:
        self._values += size
        if self._values > MAX_VALUES:
            self._fail(line, f"more than {MAX_VALUES:,} values once aliases are expanded")

    def _fail(self, line: int, message: str) -> NoReturn:
        raise SourceError(f"{self.filename}:{line} {message}")


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
