"""Plain text from the markups of the corpus's sources: HTML, reStructuredText, POD.

Each converter keeps the prose (headings, paragraphs, list items, code as
indented text) and drops the markup; the corpus builder cleans the result
further (``train.corpus.clean_text``).
"""

from __future__ import annotations

import html.parser
import re

class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: scripts, styles, navigation and sidebars
    dropped, blocks on their own lines, whitespace kept only inside <pre>.
    With ``main_only`` only what lies inside an element of role="main" counts."""

    VOID = frozenset({"br", "img", "hr", "meta", "link", "input", "wbr", "area", "base", "col",
                      "embed", "source", "track", "param"})
    SKIP_TAGS = frozenset({"script", "style", "head", "nav", "noscript", "svg", "form", "button",
                           "select", "textarea", "template", "iframe"})
    SKIP_CLASSES = frozenset({"sphinxsidebar", "related", "footer", "headerlink", "navheader",
                              "navfooter", "breadcrumbs", "mobile-nav", "toctree-wrapper", "toc"})
    PARAGRAPH = frozenset({"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6",
                           "ul", "ol", "dl", "table", "pre", "blockquote", "figure", "hr",
                           "header", "footer", "main", "aside"})
    LINE = frozenset({"br", "li", "dt", "dd", "tr", "caption", "figcaption", "th"})

    def __init__(self, main_only: bool):
        super().__init__(convert_charrefs=True)
        self.main_only = main_only
        self.stack: list[tuple[str, bool, bool, bool]] = []  # tag, skip, main, pre
        self.out: list[str] = []
        self.newlines = 0  # at the end of the output so far

    def _state(self) -> tuple[bool, bool, bool]:
        return self.stack[-1][1:] if self.stack else (False, False, False)

    def _break(self, text: str) -> None:
        """End the line ("\\n") or paragraph ("\\n\\n"), once however many blocks end here."""
        if self.out and len(text) > self.newlines:
            self.out.append("\n" * (len(text) - self.newlines))
            self.newlines = len(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        skip, main, pre = self._state()
        classes = set((attrs.get("class") or "").split())
        skip = skip or tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES)
        main = main or attrs.get("role") == "main"
        pre = pre or tag == "pre"
        if tag in self.PARAGRAPH:
            self._break("\n\n")
        elif tag in self.LINE:
            self._break("\n")
        if tag == "li" and not skip and (main or not self.main_only):
            self.out.append("- ")
        if tag not in self.VOID:
            self.stack.append((tag, skip, main, pre))

    def handle_startendtag(self, tag, attrs):
        if tag in self.PARAGRAPH | self.LINE:
            self._break("\n")

    def handle_endtag(self, tag):
        if any(t == tag for t, *_ in self.stack):
            while self.stack:
                if self.stack.pop()[0] == tag:
                    break
        if tag in self.PARAGRAPH:
            self._break("\n\n")
        elif tag in self.LINE:
            self._break("\n")
        elif tag in ("td", "th") and self.out and not self.newlines:
            self.out.append(" ")

    def handle_data(self, text):
        skip, main, pre = self._state()
        if skip or (self.main_only and not main):
            return
        if not pre:
            text = re.sub(r"\s+", " ", text)
            if not self.out or self.newlines:
                text = text.lstrip()
        if text:
            self.out.append(text)
            trailing = len(text) - len(text.rstrip("\n"))
            self.newlines = trailing if trailing < len(text) else self.newlines + trailing

    def text(self) -> str:
        return "".join(self.out)


def html_to_text(page: str) -> str:
    """The readable text of an HTML page (its role="main" part where it has one)."""
    parser = _HTMLText(main_only=re.search(r"""role=["']?main\b""", page) is not None)
    parser.feed(page)
    parser.close()
    lines = [line.rstrip() for line in parser.text().split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_RST_KEPT_DIRECTIVES = ("code-block", "code", "note", "warning", "important", "tip", "attention",
                        "caution", "hint", "literalinclude", "sourcecode")


def rst_to_text(text: str) -> str:
    """reStructuredText / kernel .txt made plainer: comments, anchors and the
    blocks of most directives (toctree, kernel-doc, ...) dropped, admonitions and
    code blocks kept without their markup, over/underlines dropped, roles
    reduced to their text."""
    out, skip_indent = [], None
    for line in text.split("\n"):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        m = re.match(r"^\.\.(\s+([\w:-]+)::|\s*$|\s+_|\s+\[|\s+\||\s+\S)", stripped)
        if m:
            if m[2] and m[2] in _RST_KEPT_DIRECTIVES:  # the directive line goes, its block stays
                code = m[2] in ("code-block", "code", "literalinclude", "sourcecode")
                out.append(line[:indent] + ("" if code else f"{m[2].capitalize()}:"))
                continue
            skip_indent = indent  # comments, anchors, substitutions, other directives
            continue
        if re.match(r"^:\w[\w-]*:( |$)", stripped):
            continue  # field lists of directives and file-wide metadata
        if len(stripped) >= 3 and re.fullmatch(r"([=\-~^*#+`'\"._])\1+", stripped):
            continue
        line = re.sub(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`", r"\1", line)
        line = re.sub(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}", r"\1", line)
        out.append(line.replace("``", "`"))
    return "\n".join(out)


def pod_to_text(pod: str) -> str:
    """The text of a POD manual: commands become headings and items, formatting
    codes their text; verbatim (indented) paragraphs are kept as they are."""
    out, skipping = [], None
    for para in re.split(r"\n\s*\n", pod):
        para = para.lstrip("\n")
        if not para.strip():
            continue
        if skipping:
            if re.match(rf"^=end\s+{re.escape(skipping)}", para):
                skipping = None
            continue
        if para.startswith("="):
            m = re.match(r"^=(\w+)\s*(.*)", para, re.DOTALL)
            command, rest = m[1], " ".join(m[2].split())
            if command.startswith("head"):
                out.append(_pod_codes(rest))
            elif command == "item":
                bullet = rest.startswith("*") or re.match(r"^\d+\.?(\s|$)", rest)
                out.append(_pod_codes(rest if bullet else f"* {rest}"))
            elif command == "begin":
                fmt = rest.split()[0] if rest else ""
                if fmt.lstrip(":") not in ("text", "man"):
                    skipping = fmt
            continue  # =over, =back, =cut, =pod, =for, =encoding ...
        if para[0] in " \t":
            out.append(para.rstrip())
        else:
            out.append(_pod_codes(para))
    return "\n\n".join(out)


_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&",
                "apos": "'", "nbsp": " "}


def _pod_escape(name: str) -> str:
    if name.isdigit() or re.fullmatch(r"0x[0-9a-fA-F]+", name):
        value = int(name, 0) if not name.isdigit() else int(name)
        return chr(value) if value < 0x110000 else ""
    return _POD_ESCAPES.get(name, html.unescape(f"&{name};"))


def _pod_link(inner: str) -> str:
    text, bar, target = inner.partition("|")
    if bar:
        return text
    target = text
    if "://" in target:
        return target
    page, slash, section = target.partition("/")
    section = section.strip('"')
    return f"{section} in {page}" if slash and page else (section or page)


def _pod_codes(text: str) -> str:
    for n in (4, 3, 2):  # multi-bracket forms first: C<< $a <=> $b >>
        text = re.sub(rf"([A-Z]){'<' * n}\s(.*?)\s{'>' * n}", lambda m: _pod_code(m[1], m[2]),
                      text, flags=re.DOTALL)
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"([A-Z])<([^<>]*)>", lambda m: _pod_code(m[1], m[2]), text)
    return text


def _pod_code(code: str, inner: str) -> str:
    if code == "E":
        return _pod_escape(inner)
    if code == "L":
        return _pod_link(inner)
    if code in ("X", "Z"):
        return ""
    return inner
