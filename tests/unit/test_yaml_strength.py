"""Cases that pin down the YAML reader where broader tests let a wrong change pass.

Each table here was written against a mutation run (mutmut) of yamlsource.py: the
value bound counted exactly, aliases, collections used as keys, the line each
parse error names and which parser words it. A case exists because some
plausible wrong version of the code passed every other fast test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import yamlsource
from extproc.config.yamlsource import SourceError, loads


def refusal(text: str) -> str:
    with pytest.raises(SourceError) as caught:
        loads(text, "f.yaml")
    return str(caught.value)


# (what, the YAML, the bound on values, the error or None when it is read)
BOUNDED = [
    # a mapping, its key, a sequence and three items: six values
    ("six values under a bound of six", "k:\n  - 1\n  - 2\n  - 3\n", 6, None),
    ("six values over a bound of five", "k:\n  - 1\n  - 2\n  - 3\n", 5, "f.yaml:4 more than 5 values once aliases are expanded"),
    ("a collection passing the bound names its line", "k:\n  - 1\n", 2, "f.yaml:2 more than 2 values once aliases are expanded"),
    # an alias counts what it repeats: the items of its sequence
    ("a scalar alias counts one", "a: &x 1\nb: *x\n", 5, None),
    ("a scalar alias passing the bound", "a: &x 1\nb: *x\n", 4, "f.yaml:2 more than 4 values once aliases are expanded"),
    ("an alias within the bound", "a: &x [1, 2]\nb: *x\n", 9, None),
    ("an alias passing the bound names its line", "a: &x [1, 2]\nb:\n  *x\n", 7, "f.yaml:3 more than 7 values once aliases are expanded"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "text", "bound", "expected"), BOUNDED, ids=[b[0] for b in BOUNDED]
)
def test_the_value_bound_counts_every_scalar_collection_and_repeated_value(
    what: str, text: str, bound: int, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(yamlsource, "MAX_VALUES", bound)
    if expected is None:
        assert loads(text, "f.yaml").data == yaml.safe_load(text)
    else:
        assert refusal(text) == expected


def test_an_alias_repeats_the_value_of_its_anchor() -> None:
    document = loads("a: &x [1, {b: 2}]\nc: *x\nd: &y 3\ne: *y\n", "f.yaml")
    assert document.data == {"a": [1, {"b": 2}], "c": [1, {"b": 2}], "d": 3, "e": 3}


# (what, the YAML, the data read, the lines recorded)
KEYS = [
    ("scalars in a block sequence", "k:\n  - 1\n  - [2]\n  - 3\n", {"k": [1, [2], 3]},
     {(): 1, ("k",): 1, ("k", 0): 2, ("k", 1): 3, ("k", 1, 0): 3, ("k", 2): 4}),
    ("a sequence as a key", "? [a, b]\n: v\nz: 1\n", {"<list>": "v", "z": 1},
     {(): 1, ("<key>",): 1, ("<key>", 0): 1, ("<key>", 1): 1, ("<list>",): 1, ("z",): 3}),
    ("a mapping as a key keeps its fields apart", "? {a: 1}\n: v\na: 2\n", {"<dict>": "v", "a": 2},
     {(): 1, ("<key>",): 1, ("<key>", "a"): 1, ("<dict>",): 1, ("a",): 3}),
    ("an alias as an item", "a: &x 1\nb:\n  - *x\n", {"a": 1, "b": [1]},
     {(): 1, ("a",): 1, ("b",): 2, ("b", 0): 3}),
    ("an alias of a sequence as a key", "s: &x [1]\n? *x\n: v\n", {"s": [1], "<list>": "v"},
     {(): 1, ("s",): 1, ("s", 0): 1, ("<list>",): 2}),
]  # fmt: skip


@pytest.mark.parametrize(("what", "text", "data", "lines"), KEYS, ids=[k[0] for k in KEYS])
def test_each_key_and_item_has_its_line_and_a_collection_key_is_named_by_its_type(
    what: str, text: str, data: dict[str, Any], lines: dict[tuple[str | int, ...], int]
) -> None:
    document = loads(text, "f.yaml")
    assert document.data == data
    assert document.lines == lines
    assert document.duplicate_keys == ()


def padded(tail: str, size: int) -> str:
    """``tail`` after one comment line, the whole exactly ``size`` characters."""
    return "#" + "x" * (size - len(tail) - 2) + "\n" + tail


LIMIT = 256 * 2**10
# (what, the YAML, the error): up to the limit in the pure-Python parser's words, then libyaml's
ERRORS = [
    ("the problem's line, not its context's", "x: [1, 2\n", "f.yaml:2 not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ("a bad character after blank lines", "\n\nx: \x01\n", "f.yaml:3 not valid YAML: special characters are not allowed (character #x0001)"),
    ("a file of exactly the limit", padded("x: [1, 2\n", LIMIT), "f.yaml:3 not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ("a file one past the limit", padded("x: [1, 2\n", LIMIT + 1), "f.yaml:3 not valid YAML: did not find expected ',' or ']'"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "text", "expected"), ERRORS, ids=[e[0] for e in ERRORS])
def test_a_parse_error_names_the_line_of_its_problem_in_the_clearest_words_affordable(
    what: str, text: str, expected: str
) -> None:
    assert len(text) in {LIMIT, LIMIT + 1} or len(text) < 100
    assert refusal(text) == expected


# (what, the error a parser raised on a text that the pure-Python parser reads, the message)
KINDS = [
    ("an error with no mark is on line 1", yaml.MarkedYAMLError(problem="odd"), "f.yaml:1 not valid YAML: odd"),
    ("an error with a context only", yaml.MarkedYAMLError(context="while odd"), "f.yaml:1 not valid YAML: while odd"),
    ("an error of no known kind has no line", yaml.YAMLError("odd"), "f.yaml: not valid YAML"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "error", "expected"), KINDS, ids=[k[0] for k in KINDS])
def test_every_kind_of_yaml_error_becomes_a_message_naming_the_file(
    what: str, error: yaml.YAMLError, expected: str
) -> None:
    assert str(yamlsource._explain("a: 1\n", "f.yaml", error)) == expected


# (what, the YAML, the data read, the lines recorded)
SCALARS = [
    ("a scalar document on a later line", "\n\nhello\n", "hello", {(): 3}),
    ("the non-specific tag ! resolves like no tag", "x: ! 123\n", {"x": 123}, {(): 1, ("x",): 1}),
    ("a str tag keeps digits a string", "x: !!str 123\n", {"x": "123"}, {(): 1, ("x",): 1}),
]


@pytest.mark.parametrize(("what", "text", "data", "lines"), SCALARS, ids=[s[0] for s in SCALARS])
def test_scalars_are_resolved_as_safe_load_does_and_keep_their_line(
    what: str, text: str, data: Any, lines: dict[tuple[str | int, ...], int]
) -> None:
    document = loads(text, "f.yaml")
    assert document.data == data == yaml.safe_load(text)
    assert document.lines == lines


def test_a_local_tag_that_cannot_be_read_is_named_whole() -> None:
    assert refusal("x: 1\ny: !custom 5\n") == "f.yaml:2 cannot read this value as !custom"


def test_a_document_carries_the_sha256_of_the_text_it_was_read_from() -> None:
    text = "a: 1\n# caf\u00e9\n"
    assert loads(text, "f.yaml").digest == hashlib.sha256(text.encode()).hexdigest()


def test_bytes_that_are_not_utf8_name_their_line_counted_from_the_first_byte(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_bytes(b"\n\nx: caf\xe9\n")
    with pytest.raises(SourceError) as caught:
        yamlsource.load(path)
    assert str(caught.value) == "gateway.yaml:3 not UTF-8 text (byte 0xe9)"
