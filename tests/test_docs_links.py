"""Every relative link of the README and docs/*.md reaches something: the file or
directory exists, and a '#anchor' names a heading of the target page (GitHub's
anchors). Fast, CPU, no imports of the project."""

import re

import pytest

from markdown_pages import ROOT, anchors, headings, links, pages, python_block, slug

EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")   # https:, mailto:, ...


def _relative_links():
    for page in pages():
        for target in links(page.read_text()):
            if not EXTERNAL.match(target):
                yield page, target


def test_every_relative_link_resolves():
    broken = []
    count = 0
    for page, target in _relative_links():
        count += 1
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor:
            if dest.suffix != ".md" or not dest.is_file():
                broken.append(f"{where} (an anchor into a page that is not Markdown)")
            elif anchor not in anchors(dest.read_text()):
                broken.append(f"{where} (no heading with anchor #{anchor})")
    assert count > 50, f"only {count} relative links found: the link reader is broken"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_stays_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {target.partition("#")[0] for target in links(readme)}
    unlinked = [p.relative_to(ROOT).as_posix() for p in pages()[1:]
                if p.relative_to(ROOT).as_posix() not in linked]
    assert not unlinked, f"docs pages missing from the README's map: {unlinked}"


@pytest.mark.parametrize("heading, anchor", [
    ("The main command: `coda-db demo`", "the-main-command-coda-db-demo"),
    ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
    ("The 2x2 study at small scale", "the-2x2-study-at-small-scale"),
    ("Models, checkpoints and generation", "models-checkpoints-and-generation"),
    ("Differences from the reference, on purpose", "differences-from-the-reference-on-purpose"),
    ("What `coda_db` holds", "what-coda_db-holds"),
    ("A [linked](x.md) *emphasised* heading", "a-linked-emphasised-heading"),
    ("Set up & test", "set-up--test"),
])
def test_anchors_follow_github(heading, anchor):
    assert slug(heading) == anchor


def test_the_reader_skips_code():
    text = ("# Top\n\n```python\n# not a heading\nx = [a](nowhere.md)\n```\n\n"
            "Prose with `[code](not-a-link.md)` and [a link](real.md#top).\n\n"
            "## Top\n\n```python\nprint(1)\n```\n")
    assert headings(text) == ["Top", "Top"]
    assert anchors(text) == {"top", "top-1"}
    assert links(text) == ["real.md#top"]
    assert python_block(text, "## Top") == "print(1)\n"
