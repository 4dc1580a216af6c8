"""Read YAML into plain values while remembering the line of every field.

Validation errors must name the file, the line and the field path, so the
loader keeps a map from field path (``("routes", 0, "credential")``) to the
1-based line where that key or item starts. PyYAML's node tree has the marks;
the usual ``safe_load`` throws them away.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# libyaml's parser when PyYAML has it (about 10x faster for large files); same nodes and marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Path_ = tuple[str | int, ...]


class YamlSyntaxError(Exception):
    """The file is not YAML at all; carries the line PyYAML reported."""

    def __init__(self, filename: str, line: int, message: str) -> None:
        super().__init__(f"{filename}:{line} {message}")
        self.filename = filename
        self.line = line


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
    """Parse ``path``; raise YamlSyntaxError with the offending line."""
    text = path.read_text(encoding="utf-8")
    return loads(text, path.name)


def loads(text: str, filename: str) -> Document:
    """Parse YAML text that came from ``filename`` (used in messages only)."""
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError:
        node = _explain(text, filename)
    lines: dict[Path_, int] = {}
    if node is None:
        return Document(filename, None, lines)
    converter = _Converter(lines)
    data = converter.value(node, ())
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Document(filename, data, lines, tuple(converter.duplicates), digest)


def _explain(text: str, filename: str) -> yaml.Node | None:
    """Raise YamlSyntaxError for bad YAML, worded by the pure-Python parser (libyaml's is terse)."""
    try:
        node: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlSyntaxError(filename, line, f"not valid YAML: {exc.problem}") from None
    return node  # both parsers should agree; if only libyaml objected, trust PyYAML


class _Converter:
    """Turns nodes into plain values, recording each path's line on the way."""

    def __init__(self, lines: dict[Path_, int]) -> None:
        self._lines = lines
        self._constructor = yaml.SafeLoader("")
        self.duplicates: list[Path_] = []

    def value(self, node: yaml.Node, path: Path_) -> Any:
        self._lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalar(key_node)
                if key in out:
                    self.duplicates.append((*path, key))
                self._lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self.value(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        """Resolve a scalar the way safe_load would (ints, bools, null, strings)."""
        if not isinstance(node, yaml.ScalarNode):
            return f"<{type(node).__name__}>"  # a mapping used as a key: validation reports it
        return self._constructor.construct_object(node, deep=True)
