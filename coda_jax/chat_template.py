"""Rendering a model's chat template (a Jinja2 template, as GGUF files and HF
tokenizer configs carry it) into the prompt text the model was tuned on.

Templates come from model files, so they are untrusted code: they run in
Jinja2's ``ImmutableSandboxedEnvironment`` (no attribute access to internals,
no mutation of the messages), never a plain ``Environment``. Needs
jinja2 >= 3.1.6 (earlier versions have known sandbox escapes).

The environment is the one HF chat templates are written for: blocks trimmed
(``trim_blocks``, ``lstrip_blocks``), ``loopcontrols``, a ``tojson`` filter
that leaves non-ASCII text and HTML characters as they are, and the globals
``raise_exception(message)`` and ``strftime_now(format)``. Variables:
``messages``, ``add_generation_prompt`` and whatever the caller passes
(``bos_token``, ``eos_token``, ``tools``, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

__all__ = ["render_chat"]


class _TemplateRaised(Exception):
    """A template's own ``raise_exception(message)``."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which a prompt must not see.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks the assistant's text
        for training masks): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set {name!r} on a namespace")

    class GuardedNamespace(jinja2.utils.Namespace):
        def __setitem__(self, name: str, value: Any) -> None:
            check_name(name)
            super().__setitem__(name, value)

    def namespace(*args: Any, **kwargs: Any) -> GuardedNamespace:
        """Jinja's ``namespace(...)``, refusing underscore names, so that a
        template stores nothing under a name that reaches Python's internals."""
        attrs = dict(*args, **kwargs)
        for name in attrs:
            check_name(name)
        return GuardedNamespace(attrs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = namespace
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                **extra: Any) -> str:
    """``template`` rendered for ``messages`` (dicts with ``role`` and ``content``).

    ``add_generation_prompt``: end with the header of the assistant's turn (the
    prompt to generate from). ``extra``: more template variables, usually
    ``bos_token`` and ``eos_token`` (see ``tokenizer_config_from_gguf``), and
    ``tools`` or ``documents`` where the template reads them.

    Raises ValueError if the template does not parse, calls
    ``raise_exception``, or fails while rendering; TypeError for a message
    that is not a dict.
    """
    import jinja2

    if not isinstance(template, str):
        raise TypeError(f"a chat template is a string, got {type(template).__name__}")
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages are dicts, got {message!r}")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}): {e.message}") from e
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **extra)
    except _TemplateRaised as e:
        raise ValueError(f"the chat template refused these messages: {e}") from e
    except jinja2.TemplateError as e:   # sandbox violations, undefined calls, ...
        raise ValueError(f"the chat template failed to render: {type(e).__name__}: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise ValueError(f"the chat template failed to render: {type(e).__name__}: {e}") from e
