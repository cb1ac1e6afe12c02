"""Entry archives (download/upload) and the server's API, without a browser."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import urllib.error
import urllib.request

import pytest

from coda_db import NeuralDatabase, RefusedError
from coda_db.web import make_server

from database_fixtures import TEXT, snapshot


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    out.seek(0)
    return out


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_an_exported_entry_imports_and_answers_the_same(db, tmp_path):
    db.save("doc", db.ingest(TEXT[:400]))
    want = db.query("Who?", temperature=0.0).tokens
    archive = io.BytesIO()
    db.export("doc", archive)
    other = NeuralDatabase(db.opened, library=tmp_path / "elsewhere")
    archive.seek(0)
    assert other.import_archive(archive).label == "doc"
    other.load("doc")
    assert other.query("Who?", temperature=0.0).tokens == want


@pytest.mark.parametrize("members, message", [
    ([(_file("../evil"), b"x")], "outside entry/"),
    ([(_file("/etc/passwd"), b"x")], "unsafe name"),
    ([(_file("entry/../../evil"), b"x")], "outside entry/"),
    ([(_link("entry/state", "/etc"), b"")], "links and devices are refused"),
    ([(_file("entry/entry.json"), b"{}")], "not a coda-db entry"),
    ([(_file("entry/x"), b"1"), (_file("entry/x"), b"2")], "twice"),
])
def test_unsafe_or_foreign_archives_are_refused_and_leave_nothing(db, members, message,
                                                                 tmp_path):
    db.save("kept", db.ingest(TEXT[:200]))
    before = snapshot(db.library.root)
    with pytest.raises(RefusedError, match=message):
        db.import_archive(_tar(members), "new")
    assert snapshot(db.library.root) == before
    assert not (tmp_path / "evil").exists()


def test_a_tampered_archive_fails_its_checksums(db):
    db.save("doc", db.ingest(TEXT[:200]))
    archive = io.BytesIO()
    db.export("doc", archive)
    archive.seek(0)
    members = []
    with tarfile.open(fileobj=archive) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isfile() else b""
            if "/d/" in m.name and data:
                data = bytes([data[0] ^ 1]) + data[1:]
            members.append((m, data))
    before = snapshot(db.library.root)
    with pytest.raises(RefusedError, match="checksum"):
        db.import_archive(_tar(members), "tampered")
    assert snapshot(db.library.root) == before
    with pytest.raises(RefusedError, match="not a coda-db entry archive"):
        db.import_archive(io.BytesIO(b"\x80\x02pickle!" * 100), "pickle")


@pytest.fixture
def server(db):
    srv = make_server(db, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def _call(url: str, data: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_the_server_api_and_its_limits(server, db, monkeypatch):
    from coda_db import web

    assert _call(server + "/")[0] == 200
    code, body = _call(server + "/api/ingest", TEXT[:500].encode(), {"X-Source": "a.txt"})
    assert code == 200 and json.loads(body)["tokens"] > 0
    assert _call(server + "/api/save", json.dumps({"label": "a"}).encode())[0] == 200
    code, body = _call(server + "/api/entries")
    listing = json.loads(body)
    # The model's name for people, not a filesystem path; each entry's state size.
    assert listing["model"] == db.opened.name and "/" not in listing["model"]
    assert listing["entries"][0]["state_bytes"] == db.list()[0].meta["document"]["bytes"] > 0
    code, body = _call(server + "/api/save", json.dumps({"label": "../../etc"}).encode())
    assert code == 400 and b"path separator" in body
    assert _call(server + "/api/download?label=../../etc/passwd")[0] == 400
    assert _call(server + "/api/download?label=missing")[0] == 404
    code, body = _call(server + "/api/ask", json.dumps({"question": "Who?", "temperature": 0,
                                                        "max_new_tokens": 6}).encode())
    assert code == 200 and body.decode() == db.query("Who?", temperature=0.0,
                                                     max_new_tokens=6).text
    monkeypatch.setattr(web, "MAX_UPLOAD_BYTES", 1000)
    code, body = _call(server + "/api/upload?label=big", b"x" * 5000)
    assert code == 413 and b"limit" in body
    assert [e.label for e in db.list()] == ["a"]
