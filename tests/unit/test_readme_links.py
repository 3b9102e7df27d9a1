"""Every relative link in the docs leads somewhere: the README, loadtests/*.md and docs/*.md
may link only to files that are in the repo, and to headings that exist in them.

An operator reading the README on a forge clicks these links; a link to a file that lives
outside the repository (or a heading renamed since) is a dead end there. Links with a
scheme (https:, mailto:) are not checked: that would need the network.
"""
import re
import unicodedata
from pathlib import Path

import pytest

from ..support import REPO

DOCS = sorted({REPO / "README.md", *REPO.glob("loadtests/*.md"), *REPO.glob("docs/*.md")})

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
# [text](target) and ![alt](target), with an optional "title"; reference definitions.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^[ ]{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without code: links shown as code are examples, not links."""
    return CODE_SPAN.sub(lambda m: m.group(0)[len(m.group(1)):-len(m.group(1))]
                         if "](" not in m.group(0) else "", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return INLINE_LINK.findall(body) + REFERENCE_DEF.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed
    (letters, digits, `_` and `-` kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text, with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def dead_links(doc: Path, text: str, root: Path) -> list[str]:
    """The relative links of `text` (the content of `doc`) that lead nowhere inside `root`."""
    dead = []
    for target in links(text):
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc.resolve()
        if not dest.is_relative_to(root.resolve()):
            dead.append(f"{target}: outside the repository")
        elif not dest.exists():
            dead.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            dead.append(f"{target}: no heading #{anchor} in {dest.relative_to(root.resolve())}")
    return dead


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_in_the_doc_leads_to_a_file_and_heading_in_the_repo(doc):
    assert dead_links(doc, doc.read_text(), REPO) == []


# The README's budget: past it, facts get repeated instead of linked to docs/REFERENCE.md
# and an operator stops finding them; trim repetition to make room.
README_MAX_LINES = 450


def test_the_readme_stays_within_its_line_budget():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


def test_the_docs_checked_include_the_readme_and_the_loadtests_readme():
    assert REPO / "README.md" in DOCS
    assert REPO / "loadtests" / "README.md" in DOCS
    assert REPO / "docs" / "REFERENCE.md" in DOCS


def test_a_missing_file_a_missing_heading_and_a_path_outside_the_repo_are_reported(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "REF.md").write_text("# Ref\n\n## Log events\n\n## Log events\n")
    doc = root / "README.md"
    text = ("[ok](docs/REF.md#log-events) [repeat](docs/REF.md#log-events-1) "
            "[web](https://example.org/x.md) [self](#top)\n"
            "# Top\n"
            "`[in code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
            "[gone](docs/GONE.md) ![img](docs/img/x.png) [bad anchor](docs/REF.md#metrics)\n"
            "[out](../shared/DESIGN.md)\n[ref]: docs/missing.md\n")
    doc.write_text(text)
    assert dead_links(doc, text, root) == [
        "docs/GONE.md: no such file",
        "docs/img/x.png: no such file",
        "docs/REF.md#metrics: no heading #metrics in docs/REF.md",
        "../shared/DESIGN.md: outside the repository",
        "docs/missing.md: no such file",
    ]


def test_a_heading_anchor_drops_code_marks_and_punctuation_as_github_does():
    assert slug("Runtime control: `l4lb ctl`") == "runtime-control-l4lb-ctl"
    assert slug("Memory per idle connection (2026-11-25)") == "memory-per-idle-connection-2026-11-25"
    assert slug("Changes from the design, and upgrading from 0.1") == \
        "changes-from-the-design-and-upgrading-from-01"
    assert slug("`[pools.NAME]`") == "poolsname"
