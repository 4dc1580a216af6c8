"""Each stage imports only the stages its ``__init__`` names, and no two import each other.

A reader trusts those two lines to learn the data flow; the code is read here (every
``import``, also inside functions) so a new import that breaks them fails a test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import extproc

ROOT = Path(extproc.__file__).parent
# What each stage may import (besides itself), as its __init__ says.
ALLOWED = {
    "config": set(),
    "policy": {"config"},
    "render": {"config"},
    "usage": {"config", "policy"},
    "spend": {"config", "policy", "usage"},
    "server": {"config", "policy", "usage"},
}


def imported(stage: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / stage).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found |= {n.split(".")[1] for n in names if n.startswith("extproc.")}
    return found - {stage}


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_a_stage_imports_only_what_its_init_says(stage: str) -> None:
    assert imported(stage) <= ALLOWED[stage]
    doc = ast.get_docstring(ast.parse((ROOT / stage / "__init__.py").read_text())) or ""
    assert all(f"``extproc.{name}``" in doc for name in ALLOWED[stage]), doc


def test_no_two_stages_import_each_other() -> None:
    for stage, allowed in ALLOWED.items():
        assert all(stage not in ALLOWED.get(other, set()) for other in allowed), stage
