"""``coda-db serve``: the web page and its JSON/streaming API on the standard library.

A ``ThreadingHTTPServer`` (no web framework: the page is one HTML document,
the API six routes, and answers stream as chunked HTTP). It binds to
127.0.0.1 unless told otherwise. One model serves every request, one request
at a time (a lock); the document last read or loaded is the server's current
one (a single-user tool). Requests name entries only by label (checked like
any label), never by path; bodies over their size limit are refused before
they are read; uploaded archives are extracted safely and verified
(:mod:`.archive`, :meth:`NeuralDatabase.import_archive`).

    GET  /                         the page
    GET  /api/entries              {"model": name, "entries": [...]}
    POST /api/ingest               body: the document (UTF-8); header X-Source: its name
    POST /api/save   {"label", "replace"}
    POST /api/load   {"label"}
    GET  /api/download?label=L     the entry as a tar archive
    POST /api/upload[?label=L]     body: a tar archive from /api/download
    POST /api/ask    {"question", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
                                   the answer, streamed as chunked text/plain
"""

from __future__ import annotations

import json
import tempfile
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .core import NeuralDatabase
from .errors import NotFoundError, RefusedError
from .page import PAGE

MAX_DOCUMENT_BYTES = 64 << 20
MAX_UPLOAD_BYTES = 4 << 30
MAX_JSON_BYTES = 1 << 16
_SPOOL = 1 << 20


class TooLarge(Exception):
    """A request body over its limit (HTTP 413)."""


def make_handler(db: NeuralDatabase) -> type[BaseHTTPRequestHandler]:
    """The request handler class serving ``db``."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "coda-db"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return  # quiet: the terminal shows only what coda-db prints

        # ------------------------------------------------------------ replies
        def _send(self, status: int, body: bytes, content_type: str,
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value: Any, status: int = 200) -> None:
            self._send(status, json.dumps(value, default=str).encode(), "application/json")

        def _error(self, err: BaseException) -> None:
            status = (HTTPStatus.NOT_FOUND if isinstance(err, FileNotFoundError) else
                      HTTPStatus.REQUEST_ENTITY_TOO_LARGE if isinstance(err, TooLarge) else
                      HTTPStatus.BAD_REQUEST if isinstance(err, (ValueError, FileExistsError))
                      else HTTPStatus.INTERNAL_SERVER_ERROR)
            self.close_connection = True  # an unread body may remain
            self._json({"error": " ".join(str(err).split()) or type(err).__name__}, status)

        def _start_chunks(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        # ------------------------------------------------------------ bodies
        def _length(self, limit: int) -> int:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                raise RefusedError("the Content-Length header is not a number") from None
            if length > limit:
                raise TooLarge(f"the request body is {length:,} bytes; the limit is {limit:,}")
            return length

        def _body_json(self) -> dict[str, Any]:
            raw = self.rfile.read(self._length(MAX_JSON_BYTES))
            try:
                value = json.loads(raw or b"{}")
            except ValueError:
                raise RefusedError("the request body is not JSON") from None
            if not isinstance(value, dict):
                raise RefusedError("the request body must be a JSON object")
            return value

        def _spool(self, limit: int) -> tempfile.SpooledTemporaryFile:
            remaining = self._length(limit)
            spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)
            while remaining:
                block = self.rfile.read(min(_SPOOL, remaining))
                if not block:
                    raise RefusedError("the request body ended early")
                spool.write(block)
                remaining -= len(block)
            spool.seek(0)
            return spool

        def _query(self) -> dict[str, str]:
            query = urllib.parse.urlsplit(self.path).query
            return {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}

        # ------------------------------------------------------------ routes
        def do_GET(self) -> None:  # noqa: N802
            route = urllib.parse.urlsplit(self.path).path
            try:
                if route == "/":
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif route == "/api/entries":
                    self._json({"model": db.opened.name,
                                "entries": [e.to_json() for e in db.list()]})
                elif route == "/api/download":
                    self._download(self._query().get("label", ""))
                else:
                    raise NotFoundError(f"no page {route}")
            except Exception as err:  # noqa: BLE001 (reported to the client)
                self._error(err)

        def _download(self, label: str) -> None:
            with tempfile.SpooledTemporaryFile(max_size=_SPOOL) as spool:
                with lock:
                    db.export(label, spool)
                size = spool.tell()
                spool.seek(0)
                name = urllib.parse.quote(f"{label}.tar")
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(size))
                self.send_header("Content-Disposition", f"attachment; filename*=UTF-8''{name}")
                self.end_headers()
                while block := spool.read(_SPOOL):
                    self.wfile.write(block)

        def do_POST(self) -> None:  # noqa: N802
            route = urllib.parse.urlsplit(self.path).path
            routes = {"/api/ingest": self._ingest, "/api/save": self._save,
                      "/api/load": self._load, "/api/upload": self._upload,
                      "/api/ask": self._ask}
            try:
                if route not in routes:
                    raise NotFoundError(f"no API {route}")
                routes[route]()
            except Exception as err:  # noqa: BLE001 (reported to the client)
                self._error(err)

        def _ingest(self) -> None:
            source = urllib.parse.unquote(self.headers.get("X-Source", "document"))[:200]
            with self._spool(MAX_DOCUMENT_BYTES) as spool, \
                    tempfile.NamedTemporaryFile(suffix=".txt") as file:
                while block := spool.read(_SPOOL):
                    file.write(block)
                file.flush()
                with lock:
                    document = db.ingest(path=file.name, source=source)
            self._json({"tokens": document.tokens, "source": source,
                        "seconds": document.meta["seconds"],
                        "state_bytes": document.meta.get("bytes")})

        def _save(self) -> None:
            body = self._body_json()
            with lock:
                entry = db.save(body.get("label"), replace=bool(body.get("replace")))
            self._json({"label": entry.label})

        def _load(self) -> None:
            body = self._body_json()
            with lock:
                document = db.load(body.get("label"))
            self._json({"label": body.get("label"), "tokens": document.tokens,
                        "state_bytes": document.meta.get("bytes")})

        def _upload(self) -> None:
            params = self._query()
            with self._spool(MAX_UPLOAD_BYTES) as spool:
                with lock:
                    entry = db.import_archive(spool, params.get("label"),
                                              replace=params.get("replace") == "1")
            self._json({"label": entry.label})

        def _ask(self) -> None:
            body = self._body_json()
            options = {k: body.get(k) for k in ("max_new_tokens", "temperature", "top_k",
                                                "top_p", "seed")}
            with lock:
                stream = db.query_stream(str(body.get("question", "")), **options)
                first = next(stream, None)  # errors before the first piece get a status
                self._start_chunks()
                try:
                    if first is not None:
                        self._chunk(first.encode())
                    for piece in stream:
                        self._chunk(piece.encode())
                except (ValueError, RuntimeError) as err:  # the status line is gone
                    self._chunk(f"\n[error: {err}]".encode())
            self._chunk(b"")

    return Handler


def make_server(db: NeuralDatabase, host: str = "127.0.0.1", port: int = 8765
                ) -> ThreadingHTTPServer:
    """The server (not yet serving); port 0 picks a free one."""
    server = ThreadingHTTPServer((host, port), make_handler(db))
    server.daemon_threads = True
    return server


def serve(db: NeuralDatabase, *, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the page until Ctrl-C."""
    server = make_server(db, host, port)
    print(f"coda-db: serving {db.opened.name} on http://{host}:{server.server_port}/ "
          "(Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
