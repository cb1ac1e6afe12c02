"""Reading the project's Markdown pages as GitHub renders them: headings (outside
fenced code), their anchors, the relative links and the code blocks of a section."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def pages() -> list[Path]:
    """The README and every page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def outside_fences(text: str) -> list[tuple[str, bool]]:
    """Every line with whether it is prose (True) or inside a fenced code block
    (False, the fences included)."""
    lines, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)[0] * 3
            lines.append((line, False))
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            lines.append((line, False))
        else:
            lines.append((line, True))
    return lines


def headings(text: str) -> list[str]:
    """The headings' texts, in order (fenced code's '#' lines are not headings)."""
    found = []
    for line, prose in outside_fences(text):
        match = HEADING.match(line) if prose else None
        if match:
            found.append(match.group(2))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (no code marks, emphasis or
    link targets), lower case, punctuation other than '-' and '_' dropped, each
    space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links, images: their text
    text = re.sub(r"<[^>]+>", "", text)                           # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)                # _emphasis_, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, duplicates numbered as GitHub does (-1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (their brackets are
    not links)."""
    kept = "\n".join(line if is_prose else "" for line, is_prose in outside_fences(text))
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", kept, flags=re.S)


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[str]:
    """Every inline link and image target of the prose."""
    return LINK.findall(prose(text))


def section(text: str, heading: str) -> list[str]:
    """The lines under ``heading`` (a whole heading line, e.g. '## Usage') up to the
    next heading of any level."""
    lines, inside = [], False
    for line, is_prose in outside_fences(text):
        if is_prose and HEADING.match(line):
            if inside:
                break
            inside = line.strip() == heading
            continue
        if inside:
            lines.append(line)
    if not inside:
        raise LookupError(f"no heading {heading!r}")
    return lines


def python_block(text: str, heading: str) -> str:
    """The first ```python block of the section under ``heading``."""
    block, inside = [], False
    for line in section(text, heading):
        if not inside and line.strip() == "```python":
            inside = True
        elif inside and line.strip().startswith("```"):
            return "\n".join(block) + "\n"
        elif inside:
            block.append(line)
    raise LookupError(f"no python block under {heading!r}")
