"""The pages hold together: every relative link in README.md and docs/*.md resolves (file and
heading), the README stays short, and every shell block shown is either run by a test or
marked as illustrative.

The marker is an HTML comment on the line right above the block's opening fence:
``<!-- run by tests/….py … -->`` names the test that runs the commands (it must exist and name
the page), ``<!-- illustrative: why -->`` says they are shown, not run (a real key, Docker, a
cluster).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "bench" / "README.md",
    *sorted((ROOT / "bench" / "results").glob("20*.md")),
]
SHELLS = {"sh", "bash", "shell", "console"}
_FENCE = re.compile(r"^[ \t]*```(\S*)\n(.*?)^[ \t]*```", re.M | re.S)
_LINK = re.compile(r"(?<!!)\[[^\]\n]+\]\(([^)\s]+)\)")
_RUN_BY = re.compile(r"^<!-- run by (tests/\S+\.py)\b.*-->$")
_ILLUSTRATIVE = re.compile(r"^<!-- illustrative\b.*-->$")


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _prose(text: str) -> str:
    """The page without its code blocks (a link-like text in a block is not a link)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", _prose(page.read_text()), re.M)
    return {slug(h) for h in headings}


def _links(page: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


def _shell_blocks(page: Path) -> list[tuple[int, str, str]]:
    """(line, the line above the fence, the block) of every shell block."""
    text = page.read_text()
    found = []
    for match in _FENCE.finditer(text):
        if match.group(1) in SHELLS:
            line = text.count("\n", 0, match.start()) + 1
            above = text[: match.start()].removesuffix("\n").rsplit("\n", 1)[-1].strip()
            found.append((line, above, match.group(2)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {_name(where)}")
    assert not broken, f"{_name(page)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_shell_block_is_run_by_a_test_or_marked_illustrative(page: Path) -> None:
    unmarked, wrong = [], []
    for line, above, _block in _shell_blocks(page):
        if run_by := _RUN_BY.match(above):
            test = ROOT / run_by.group(1)
            if not test.is_file() or _name(page) not in test.read_text():
                wrong.append(
                    f"line {line}: {run_by.group(1)} is missing or never names {_name(page)}"
                )
        elif not _ILLUSTRATIVE.match(above):
            unmarked.append(f"line {line}")
    assert not wrong, f"{_name(page)}: " + "; ".join(wrong)
    assert not unmarked, (
        f"{_name(page)}: shell blocks without '<!-- run by tests/….py -->' or "
        f"'<!-- illustrative: … -->' on the line above: {', '.join(unmarked)}"
    )


def test_the_readme_is_at_most_200_lines_and_links_every_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {Path(t.partition("#")[0]).name for t in _links(ROOT / "README.md")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """The link and marker checks are not vacuous: a broken link and a bare block are seen."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [bad](#nowhere) [gone](missing.md)\n\n```sh\necho hi\n```\n"
    )
    assert _links(page) == ["#title", "#nowhere", "missing.md"]
    assert anchors(page) == {"title"}
    assert [above for _, above, _ in _shell_blocks(page)] == [""]  # the blank line above
    assert slug("Live changes: config, secrets, keys") == "live-changes-config-secrets-keys"
    assert slug("People from your SSO (OIDC)") == "people-from-your-sso-oidc"
