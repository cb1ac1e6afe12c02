"""The ``coda-db`` command: ingest, list, query, info, delete, serve, demo.

    coda-db ingest FILE --label L [--model M] [--replace]
    coda-db list [--json]
    coda-db query L "question" [--max-new-tokens N --temperature T --top-k K --top-p P
                                --seed S] [--json]
    coda-db info L [--json]
    coda-db delete L
    coda-db serve [--host 127.0.0.1] [--port 8765]
    coda-db demo [--model M] [--library DIR] [--keep] [--documents FILE]

The library is ``--library DIR``, else ``$CODA_DB_LIBRARY``, else
``$XDG_DATA_HOME/coda-db`` (``~/.local/share/coda-db``). The model is
``--model`` (a coda_jax model checkpoint with a tokenizer.json, or a HF
directory with --adapters), else ``$CODA_DB_MODEL``, else, for ``query``, the
model recorded with the entry, else the bundled default model (when this
installation has one: :mod:`.bundled`).

``demo`` reads the three bundled demo documents that suit the model once,
saves their states in a temporary library (or ``--library``), loads them in a
new process and asks the bundled questions (:mod:`.demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Sequence

from .cache import enable_compilation_cache
from .errors import NotFoundError, RefusedError

EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_WRONG_ANSWERS = 4
EXIT_CODES = """\
exit codes:
  0    done ('demo': every answer correct)
  1    usage: unknown or missing arguments, no model given (and none bundled)
  2    not found: the label, file or model does not exist, a HF directory without
       its adapter file (without --untrained) (for 'demo': no --model and no
       bundled model)
  3    refused: a bad input (empty, binary or non-UTF-8 document, a label with path
       separators or control characters, bad sampling values), a label that is taken
       (without --replace), a damaged entry, a state made by another model or tokenizer,
       a model that is not bounded
  4    'demo' only: it ran, and some answers were wrong
  130  interrupted (Ctrl-C): nothing was saved"""
__doc__ += "\n" + EXIT_CODES + "\n"


class UsageError(Exception):
    """Arguments that do not fit together (exit code 1)."""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as exit code 1 (argparse's own is 2, our 'not found')."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model checkpoint directory, or HF directory "
                        "(default: $CODA_DB_MODEL, else the bundled default model)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the model's own)")
    parser.add_argument("--adapters", help="CoDA adapter file for a HF directory "
                        "(default: MODEL/coda_adapters.pt)")
    parser.add_argument("--untrained", action="store_true",
                        help="allow a HF directory without adapters (answers are noise)")


def build_parser() -> argparse.ArgumentParser:
    """The ``coda-db`` argument parser."""
    common = Parser(add_help=False)
    common.add_argument("--library", help="library directory (default: $CODA_DB_LIBRARY, "
                        "else $XDG_DATA_HOME/coda-db)")
    common.add_argument("--json", action="store_true", help="print JSON")
    parser = Parser(prog="coda-db", description=__doc__.split("\n\n")[0],
                    epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    ingest = commands.add_parser("ingest", parents=[common], help="read a document, save it")
    ingest.add_argument("file")
    ingest.add_argument("--label", required=True)
    ingest.add_argument("--replace", action="store_true", help="replace an entry of that label")
    _model_options(ingest)
    commands.add_parser("list", parents=[common], help="the saved documents, newest first")
    query = commands.add_parser("query", parents=[common], help="ask a saved document")
    query.add_argument("label")
    query.add_argument("question")
    query.add_argument("--max-new-tokens", type=int)
    query.add_argument("--temperature", type=float)
    query.add_argument("--top-k", type=int)
    query.add_argument("--top-p", type=float)
    query.add_argument("--seed", type=int)
    _model_options(query)
    info = commands.add_parser("info", parents=[common], help="what an entry holds")
    info.add_argument("label")
    delete = commands.add_parser("delete", parents=[common], help="remove an entry")
    delete.add_argument("label")
    serve = commands.add_parser("serve", parents=[common], help="the web page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    _model_options(serve)
    demo = commands.add_parser("demo", help="read three documents, save their states, "
                               "answer from them in a new process")
    demo.add_argument("--library", help="save the demo's states in this library (default: "
                      "a temporary one)")
    demo.add_argument("--keep", action="store_true",
                      help="keep the saved states (and the temporary library)")
    demo.add_argument("--documents", help="demo documents JSON (default: the bundled ones "
                      "that suit the model)")
    _model_options(demo)
    return parser


def _model_path(args: argparse.Namespace, recorded: str | None = None) -> str:
    from .bundled import bundled_model_path

    model = args.model or os.environ.get("CODA_DB_MODEL") or recorded or bundled_model_path()
    if not model:
        raise UsageError("no model: pass --model MODEL_DIR or set $CODA_DB_MODEL (this "
                         "installation has no bundled default model)")
    return str(model)


def _database(args: argparse.Namespace, recorded: str | None = None):
    from .core import NeuralDatabase

    return NeuralDatabase(_model_path(args, recorded), library=args.library,
                          tokenizer=args.tokenizer, adapters=args.adapters,
                          untrained=args.untrained)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=1, default=str))


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def cmd_ingest(args: argparse.Namespace) -> None:
    from .library import check_label

    check_label(args.label)  # before the model is read
    db = _database(args)
    document = db.ingest(path=args.file, progress=not args.json)
    entry = db.save(args.label, document, replace=args.replace)
    if args.json:
        _print_json({"label": entry.label, "tokens": document.tokens, "path": str(entry.path)})
    else:
        print(f"saved {entry.label!r}: {document.tokens:,} tokens read in "
              f"{document.meta['seconds']:.1f} s -> {entry.path}")


def cmd_list(args: argparse.Namespace) -> None:
    from .library import Library

    entries = Library(args.library).entries()
    if args.json:
        _print_json([e.to_json() for e in entries])
        return
    if not entries:
        print("the library is empty")
    for e in entries:
        j = e.to_json()
        if e.status == "ok":
            print(f"{e.label:30}  {j['tokens']:>10,} tokens  {_when(j['saved'])}  {j['source']}")
        else:
            print(f"{e.label:30}  {e.status.upper()}: {e.problem}")


def cmd_query(args: argparse.Namespace) -> None:
    from .library import Library

    entry = Library(args.library).entry(args.label)
    model = entry.meta.get("document", {}).get("model", {})
    recorded = model.get("path", model.get("name"))  # entries saved before "path": a path
    db = _database(args, recorded)
    db.load(args.label)
    stream = db.query_stream(args.question, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed)
    while True:
        try:
            piece = next(stream)
        except StopIteration as done:
            answer = done.value
            break
        if not args.json:
            print(piece, end="", flush=True)
    if args.json:
        _print_json({"label": args.label, "question": args.question, "answer": answer.text,
                     "tokens": answer.tokens, "stopped": answer.stopped})
    else:
        print()


def cmd_info(args: argparse.Namespace) -> None:
    from .core import entry_info
    from .library import Library

    info = entry_info(Library(args.library).entry(args.label))
    if args.json:
        _print_json(info)
        return
    for key in ("label", "status", "problem", "source", "tokens", "chars", "bytes_on_disk",
                "bytes_in_memory", "model", "weights_sha256", "path"):
        if info.get(key) is not None:
            value = info[key]
            print(f"{key:>16}: {value:,}" if isinstance(value, int) else f"{key:>16}: {value}")
    print(f"{'saved':>16}: {_when(info['saved'])}")
    for bank, fill in (info.get("fill") or {}).items():
        print(f"{'fill ' + bank:>16}: {fill:.0%}")


def cmd_delete(args: argparse.Namespace) -> None:
    from .library import Library

    Library(args.library).delete(args.label)
    if not args.json:
        print(f"deleted {args.label!r}")


def cmd_serve(args: argparse.Namespace) -> None:
    from .web import serve

    serve(_database(args), host=args.host, port=args.port)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    right = run_demo(model=args.model, library=args.library, keep=args.keep,
                     documents=args.documents, tokenizer=args.tokenizer,
                     adapters=args.adapters, untrained=args.untrained,
                     out=lambda line: print(line, flush=True))
    return EXIT_OK if right else EXIT_WRONG_ANSWERS


COMMANDS = {"ingest": cmd_ingest, "list": cmd_list, "query": cmd_query, "info": cmd_info,
            "delete": cmd_delete, "serve": cmd_serve, "demo": cmd_demo}


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``coda-db`` with ``argv``; return the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (1)
        return int(done.code or 0)
    warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}",
                                                              file=sys.stderr)
    enable_compilation_cache()  # a later command loads what this one compiles
    try:
        code = COMMANDS[args.command](args)
    except UsageError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except (NotFoundError, FileNotFoundError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (RefusedError, ValueError, FileExistsError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code or EXIT_OK


def entry_point() -> None:
    """The console script."""
    raise SystemExit(main())


if __name__ == "__main__":
    entry_point()
