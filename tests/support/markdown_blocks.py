"""The README's and docs/'s Markdown as the doc tests read it: fenced code
blocks with their language and marks, inline code spans, links and the
anchors MkDocs gives headings."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
#: Every page a reader gets: the README, each page of docs/, and deploy/'s guide.
PAGES = (README, *sorted(DOCS.glob("*.md")), REPO / "deploy/README.md")

#: An HTML comment on the line before a block, invisible when rendered:
#: ``<!-- run -->`` says a test runs the block as written.
MARK = re.compile(r"^<!--\s*([\w -]+?)\s*-->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<language>[\w-]*)")


@dataclass(frozen=True)
class CodeBlock:
    page: Path
    #: The 1-based line of its opening fence.
    line: int
    language: str
    text: str
    marks: frozenset[str]

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def code_blocks(page: Path) -> list[CodeBlock]:
    """Each fenced block of ``page``, in order (fences indented in list items too)."""
    lines = page.read_text().split("\n")
    blocks = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body = []
        end = index + 1
        while end < len(lines) and not lines[end].startswith(indent + fence):
            body.append(lines[end].removeprefix(indent))
            end += 1
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        mark = MARK.match(previous.strip())
        marks = frozenset(mark[1].split()) if mark else frozenset()
        blocks.append(
            CodeBlock(page, index + 1, opening["language"], "\n".join(body) + "\n", marks)
        )
        index = end + 1
    return blocks


def prose(page: Path) -> str:
    """``page`` without its fenced blocks, fences included (a fence's
    backticks would pair with an inline span's)."""
    kept = []
    closing = None
    for line in page.read_text().split("\n"):
        if closing is not None:
            if line.startswith(closing):
                closing = None
            continue
        opening = FENCE.match(line)
        if opening is not None:
            closing = opening["indent"] + opening["fence"]
            continue
        kept.append(line)
    return "\n".join(kept)


def inline_code(page: Path) -> list[str]:
    """The inline code spans of ``page``'s prose and tables."""
    return re.findall(r"`([^`\n]+)`", prose(page))


def heading_anchor(heading: str) -> str:
    """The id MkDocs (Python-Markdown's toc) gives a heading; GitHub's is the
    same for the headings these pages have."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {heading_anchor(match[1]) for match in re.finditer(r"^#{1,6} (.+)$", prose(page), re.M)}


def links(page: Path) -> list[str]:
    """The targets of ``page``'s Markdown links (prose only)."""
    return re.findall(r"\]\(([^)\s]+)\)", prose(page))
