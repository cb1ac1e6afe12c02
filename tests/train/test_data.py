"""The data side of training: tokenizer, shards, packed batches, and the corpus builder.

Everything here is made up on the spot (no package corpus is needed) and runs
on CPU in a few seconds.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from train.markup import html_to_text, pod_to_text
from train.r_data import read_r_lazyload
from train import corpus
from train.data import (
    PackedBatches,
    check_vocab,
    encode_documents,
    load_tokenizer,
    read_tokens,
    tokenizer_fingerprint,
    train_tokenizer,
    write_shards,
)

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "boxing", "matches", "in", "the", "old", "town", "hall", "near", "river", "bank"]


def _sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = list(rng.choice(WORDS, size=rng.integers(6, 14)))
        words.insert(int(rng.integers(0, len(words))), str(int(rng.integers(0, 100000))))
        out.append(" ".join(words).capitalize() + ".")
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(_sentences(400), 420, path)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_single_digits(tok):
    sentence = "In 2024 the fox paid $19.99 for order #A-1337 (ref. 000451), twice."
    ids = tok.encode(sentence).ids
    assert tok.decode(ids) == sentence
    digit_tokens = [t for t in tok.encode(sentence).tokens if any(c.isdigit() for c in t)]
    assert len(digit_tokens) == sum(c.isdigit() for c in sentence)  # one token per digit
    for token in tok.get_vocab():
        assert sum(c.isdigit() for c in token) <= 1, token
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|pad|>") == 1
    assert tok.decode(tok.encode("naïve café ☃").ids) == "naïve café ☃"  # every byte encodes


def test_digits_may_merge_when_not_split(tmp_path):
    texts = ["order 2024 and 2024 again 2024"] * 50
    tok = train_tokenizer(texts, 300, tmp_path / "t.json", split_digits=False)
    assert any(sum(c.isdigit() for c in t) > 1 for t in tok.get_vocab())


def test_load_tokenizer_and_fingerprint(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    loaded = load_tokenizer(path)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == tokenizer_fingerprint(tok)  # a dir
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)


def test_train_tokenizer_refuses_to_clobber_other_files(tmp_path):
    target = tmp_path / "notes.json"
    target.write_text('{"mine": true}')
    with pytest.raises(ValueError, match="refusing to overwrite"):
        train_tokenizer(_sentences(20), 300, target)
    assert target.read_text() == '{"mine": true}'
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(_sentences(20), 100, tmp_path / "t.json")
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", ""], 300, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_encode_documents_ends_every_document(tok):
    docs = ["The fox.", "Seven wizards 42.", ""]
    ids = encode_documents(tok, docs)
    assert ids.dtype == np.uint32
    assert np.flatnonzero(ids == 0).size == 3 and ids[-1] == 0
    pieces = np.split(ids, np.flatnonzero(ids == 0) + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs
    assert encode_documents(tok, []).size == 0
    assert np.array_equal(encode_documents(tok, docs, eos_id=7)[ids == 0], [7, 7, 7])


def test_check_vocab(tok):
    size = tok.get_vocab_size()
    check_vocab(tok, size)
    check_vocab(tok, size + 100)
    check_vocab(1000, 1000)
    with pytest.raises(ValueError, match=f"vocabulary has {size - 1}"):
        check_vocab(tok, size - 1)
    with pytest.raises(ValueError, match="1001 ids"):
        check_vocab(1001, 1000)
    with pytest.raises(ValueError):
        check_vocab(tok, 0)
    with pytest.raises(TypeError):
        check_vocab("tokenizer.json", 1000)


# --------------------------------------------------------------- shards, reading


def test_shards_round_trip(tmp_path):
    ids = np.arange(1000, dtype=np.uint32) * 7
    paths = write_shards(ids, tmp_path / "shards", shard_tokens=300, meta={"split": "train"})
    assert [p.name for p in paths] == [f"shard_{i:05d}.npy" for i in range(4)]
    back = read_tokens(tmp_path / "shards")
    assert np.array_equal(back, ids) and back.dtype == np.uint16  # the ids fit 16 bits
    record = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert record["num_tokens"] == 1000 and record["meta"] == {"split": "train"}
    big = np.array([1, 70000, 3], np.uint32)
    write_shards(big, tmp_path / "big")
    assert read_tokens(tmp_path / "big").dtype == np.uint32
    with pytest.raises(FileExistsError):
        write_shards(ids, tmp_path / "shards")
    (tmp_path / "empty").mkdir()
    write_shards(ids[:5], tmp_path / "empty")  # an empty directory is fine
    assert np.array_equal(read_tokens(tmp_path / "empty"), ids[:5])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_read_tokens_files(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        read_tokens(tmp_path / "missing.npy")
    np.save(tmp_path / "ids.npy", np.array([5, 6, 7], np.uint32))
    assert read_tokens(tmp_path / "ids.npy").tolist() == [5, 6, 7]
    np.save(tmp_path / "none.npy", np.zeros(0, np.uint32))
    with pytest.raises(ValueError, match="none.npy"):
        read_tokens(tmp_path / "none.npy")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_tokens(tmp_path / "empty.txt", tokenizer=tok)
    (tmp_path / "a.txt").write_text("The fox 12.")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        read_tokens(tmp_path / "a.txt")
    assert np.array_equal(read_tokens(tmp_path / "a.txt", tok), encode_documents(tok, ["The fox 12."]))
    texts = ["The fox.", "Seven wizards, 1984."]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n\n")
    assert np.array_equal(read_tokens(tmp_path / "c.jsonl", tok), encode_documents(tok, texts))
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + '{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_tokens(tmp_path / "bad.jsonl", tok)
    (tmp_path / "blank.jsonl").write_text("")
    with pytest.raises(ValueError, match="blank.jsonl"):
        read_tokens(tmp_path / "blank.jsonl", tok)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a token shard directory"):
        read_tokens(tmp_path / "plain")


# ------------------------------------------------------------------ batches


def test_packed_batches_deterministic_and_resumable():
    tokens = np.arange(10_000, dtype=np.uint32)
    a = PackedBatches(tokens, seq_len=15, batch_size=8, seed=3)
    b = PackedBatches(tokens, seq_len=15, batch_size=8, seed=3)
    assert a.sequences_per_epoch == 10_000 // 16
    uninterrupted, position = [], 0
    for _ in range(200):  # 1600 sequences: past two epoch boundaries
        batch, position = a.batch(position)
        uninterrupted.append(batch)
    assert position == 1600
    first, p = a.batch(0)
    assert first.dtype == np.int32 and first.shape == (8, 16)
    assert np.array_equal(first, b.batch(0)[0]) and p == 8
    assert np.array_equal(first[:, 1:], first[:, :-1] + 1)  # targets follow the inputs
    resumed, position = [], 37 * 8  # a fresh object, as after a restart
    for _ in range(200 - 37):
        batch, position = b.batch(position)
        resumed.append(batch)
    assert all(np.array_equal(x, y) for x, y in zip(uninterrupted[37:], resumed))
    assert not np.array_equal(first, PackedBatches(tokens, seq_len=15, batch_size=8, seed=4).batch(0)[0])


def test_packed_batches_use_each_token_once_per_epoch():
    tokens = np.arange(1003, dtype=np.uint32)  # 1003 = 62 * 16 + 11: an 11-token tail
    batches = PackedBatches(tokens, seq_len=15, batch_size=5, seed=0)
    n = batches.sequences_per_epoch
    assert n == 62
    for epoch in range(2):
        rows = np.concatenate([batches.batch(epoch * n + k)[0][:1] for k in range(n)])
        used = rows.ravel()
        assert used.size == np.unique(used).size == n * 16  # nothing used twice
        assert np.all(rows[:, 0] % 16 == 0)  # whole, aligned, non-overlapping sequences
        assert used.max() < n * 16  # the tail is never used
    epoch0 = [batches.batch(k)[0][0, 0] for k in range(n)]
    epoch1 = [batches.batch(n + k)[0][0, 0] for k in range(n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # a new order each epoch
    crossing, _ = batches.batch(n - 2)  # runs into the next epoch
    assert np.array_equal(crossing[2], batches.batch(n)[0][0])


def test_packed_batches_refusals():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedBatches(np.arange(16), seq_len=16, batch_size=2, seed=0)
    batches = PackedBatches(np.arange(17), seq_len=16, batch_size=2, seed=0)
    assert batches.sequences_per_epoch == 1
    with pytest.raises(ValueError, match="position"):
        batches.batch(-1)
    with pytest.raises(ValueError):
        PackedBatches(np.arange(100), seq_len=0, batch_size=2, seed=0)
    with pytest.raises(ValueError):
        PackedBatches(np.arange(100).reshape(10, 10), seq_len=4, batch_size=2, seed=0)


# ------------------------------------------------------------ cleaning helpers


def test_cleaning_and_markup():
    assert corpus.clean_text("  \u201cNa\u00efve\u201d caf\u00e9 \u2014 done\u2026  \n\n\n\n  next\t1") \
        == '"Naive" cafe -- done...\n\nnext  1'
    assert corpus.clean_text("\u6f22\u5b57\u306e\u6587\u7ae0\u3067\u3059 ok") is None  # not English
    assert corpus.clean_text(" \n \u2500\u2500 \n") is None
    page = ("<html><head><title>T</title><style>p{}</style></head><body>"
            "<div class='sphinxsidebar'>nav</div><div role='main'><h1>Title&para;</h1>"
            "<p>Some   <b>bold</b>\ntext.</p><pre>  x = 1\n  y = 2</pre><ul><li>one</li>"
            "<li>two</li></ul></div><script>var x;</script></body></html>")
    assert html_to_text(page) == "Title\u00b6\n\nSome bold text.\n\n  x = 1\n  y = 2\n\n- one\n- two"
    pod = ("=head1 NAME\n\nperlfoo - B<bold> and C<< $a <=> $b >>, see L<perlop/Ops>"
           " or L<the site|https://x.org>.\n\n    verbatim C<kept>\n\n=over\n\n=item * E<lt>tagE<gt>\n\n"
           "=back\n\n=begin html\n\n<p>no</p>\n\n=end html\n\n=cut\n")
    assert pod_to_text(pod) == ("NAME\n\nperlfoo - bold and $a <=> $b, see Ops in perlop or "
                                       "the site.\n\n    verbatim C<kept>\n\n* <tag>")


def test_heldout_groups():
    groups = {"a": [f"a{i}" for i in range(200)], "b": ["b0", "b1", "shared"],
              "c": ["shared", "c1"], "d": ["alone"]}
    held = corpus.heldout_groups(groups, 0.1, seed=0)
    assert held == corpus.heldout_groups(groups, 0.1, seed=0)
    assert held != corpus.heldout_groups(groups, 0.1, seed=1)
    assert 5 <= len(held & set(groups["a"])) <= 40
    for name in ("b", "c"):  # every source of 2+ groups holds some out
        assert held & set(groups[name])
    assert "alone" not in held or corpus._unit_hash(0, "alone") < 0.1
    assert corpus.heldout_groups(groups, 0.0, seed=0) == set()


def _r_int(v: int) -> bytes:
    return struct.pack(">i", v)


def _r_chars(s: str) -> bytes:
    b = s.encode()
    return _r_int(0x40009) + _r_int(len(b)) + b


def _r_named(items: list[bytes], names: list[str], kind: int) -> bytes:
    """An R vector of ``kind`` with a names attribute, XDR-serialised (version 3)."""
    names_attr = (_r_int(0x402) + _r_int(1) + _r_chars("names") + _r_int(16)
                  + _r_int(len(names)) + b"".join(_r_chars(n) for n in names) + _r_int(254))
    return _r_int(kind | 0x200) + _r_int(len(items)) + b"".join(items) + names_attr


def _r_serialise(body: bytes) -> bytes:
    return b"X\n" + _r_int(3) + _r_int(0x40201) + _r_int(0x30500) + _r_int(5) + b"UTF-8" + body


def test_janeaustenr_reader_without_r(tmp_path):
    """An R lazy-load database like janeaustenr's data, written by hand, reads back
    through the builder's R reader and splits into chapters."""
    books = {"emma": ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome.", "", "", "",
                      "CHAPTER II", "", "Mr. Weston was a native."],
             "persuasion": ["Persuasion", "", "Chapter 1", "", "Sir Walter Elliot."]}
    rdb, spans = b"", []
    for lines in books.values():
        body = _r_serialise(_r_int(16) + _r_int(len(lines)) + b"".join(_r_chars(s) for s in lines))
        record = struct.pack(">I", len(body)) + zlib.compress(body)
        spans.append(_r_int(13) + _r_int(2) + _r_int(len(rdb)) + _r_int(len(record)))
        rdb += record
    variables = _r_named(spans, list(books), 19)
    index = _r_named([variables, _r_int(19) + _r_int(0), _r_int(10) + _r_int(1) + _r_int(1)],
                     ["variables", "references", "compressed"], 19)
    root = tmp_path / "janeaustenr"
    (root / "data").mkdir(parents=True)
    (root / "data" / "Rdata.rdx").write_bytes(gzip.compress(_r_serialise(index)))
    (root / "data" / "Rdata.rdb").write_bytes(rdb)
    objects = read_r_lazyload(root / "data" / "Rdata.rdx")
    assert objects == books
    found = corpus.find_janeaustenr(type("Args", (), {"janeaustenr": str(root)})())
    docs = list(found.documents())
    assert [d.name for d in docs] == ["Emma #0", "Emma #1", "Persuasion #0"]
    assert docs[1].text.startswith("CHAPTER II")


# ------------------------------------------------------------ corpus builder


def _make_text_dir(root: Path) -> Path:
    root.mkdir()
    for i, text in enumerate(_sentences(14, seed=1)):
        paragraph = " ".join(_sentences(6, seed=100 + i))
        (root / f"doc{i:02d}.txt").write_text(f"Story {i}\n\n{text}\n\n{paragraph}\n")
    (root / "nested").mkdir()
    (root / "nested" / "dup.txt").write_text((root / "doc03.txt").read_text())  # a duplicate
    (root / "nested" / "kanji.txt").write_text("\u6f22\u5b57" * 50)  # not English: dropped
    (root / "ignored.md").write_text("not a .txt file")
    return root


def _build(out: Path, text_dir: Path, *extra: str) -> int:
    return corpus.main([str(out), "--sources", "text-dir,shakespeare", "--text-dir", str(text_dir),
                        "--vocab-size", "320", "--heldout-fraction", "0.2", "--seed", "5",
                        "--quiet", *extra])


def test_corpus_builder_end_to_end(tmp_path, capsys):
    text_dir = _make_text_dir(tmp_path / "texts")
    out = tmp_path / "corpus"
    assert _build(out, text_dir) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "coda_jax.corpus" and manifest["seed"] == 5
    assert "shakespeare" in manifest["sources_missing"]
    source = manifest["sources"]["text-dir"]
    assert source["documents_dropped_duplicate"] == 1
    assert source["documents_dropped_empty_or_non_english"] == 1
    assert source["documents"]["train"] + source["documents"]["heldout"] == 14
    assert 1 <= source["documents"]["heldout"] <= 7
    tok = load_tokenizer(out / "tokenizer.json")
    assert tokenizer_fingerprint(tok) == manifest["tokenizer_fingerprint"]
    assert manifest["vocab_size"] == tok.get_vocab_size() <= 320
    train, heldout = read_tokens(out / "train"), read_tokens(out / "heldout")
    assert train.size == source["tokens"]["train"] == manifest["totals"]["train"]["tokens"]
    assert heldout.size == source["tokens"]["heldout"]
    assert np.count_nonzero(heldout == 0) == source["documents"]["heldout"]
    held_text = tok.decode(heldout.tolist(), skip_special_tokens=False)
    train_text = tok.decode(train.tolist(), skip_special_tokens=False)
    for name in source["heldout_documents"]:  # split by document: each on one side only
        story = (text_dir / name).read_text().split("\n")[0]
        assert f"{story}\n" in held_text and f"{story}\n" not in train_text
    PackedBatches(train, seq_len=32, batch_size=4, seed=0).batch(0)
    # the same inputs and seed build the same corpus
    assert _build(tmp_path / "again", text_dir) == 0
    assert np.array_equal(read_tokens(tmp_path / "again" / "train"), train)
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["tokenizer_fingerprint"] == manifest["tokenizer_fingerprint"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    capsys.readouterr()


def test_corpus_builder_refuses_what_is_not_its_own(tmp_path, capsys):
    text_dir = _make_text_dir(tmp_path / "texts")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    (foreign / "sub").mkdir()
    (foreign / "sub" / "manifest.json").write_text('{"format": "something else"}')
    before = _snapshot(foreign)
    for extra in ((), ("--overwrite",)):
        assert _build(foreign, text_dir, *extra) == corpus.EXIT_REFUSED
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(foreign) in err
        assert _snapshot(foreign) == before

    fake = tmp_path / "fake"  # a manifest.json, but not ours
    fake.mkdir()
    (fake / "manifest.json").write_text('{"format": "other"}')
    assert _build(fake, text_dir, "--overwrite") == corpus.EXIT_REFUSED
    assert json.loads((fake / "manifest.json").read_text()) == {"format": "other"}

    ours = tmp_path / "ours"
    ours.mkdir()  # an empty directory may be filled
    assert _build(ours, text_dir) == 0
    built = _snapshot(ours)
    assert _build(ours, text_dir) == corpus.EXIT_REFUSED  # not without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(ours) == built
    assert _build(ours, text_dir, "--overwrite", "--seed", "6") == 0
    assert json.loads((ours / "manifest.json").read_text())["seed"] == 6

    inside = text_dir / "out"  # an output inside an input
    assert _build(inside, text_dir) == corpus.EXIT_REFUSED and not inside.exists()
    assert _build(tmp_path / "x", tmp_path / "no-such-dir") == corpus.EXIT_NOT_FOUND
    assert corpus.main([str(tmp_path / "y"), "--sources", "nonsense", "--quiet"]) == corpus.EXIT_USAGE
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    capsys.readouterr()


def test_a_machine_without_text_packages_falls_back_to_the_stdlib(tmp_path, monkeypatch,
                                                                 capsys):
    # A fresh machine: none of the package sources is installed.
    absent = {name: (lambda args: "not installed") for name in corpus.SOURCES}
    monkeypatch.setattr(corpus, "SOURCES", absent)
    out = tmp_path / "corpus"
    assert corpus.main([str(out), "--vocab-size", "300"]) == 0
    err = capsys.readouterr().err
    assert "falling back to python-stdlib" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["python-stdlib"]
    source = manifest["sources"]["python-stdlib"]
    assert source["documents"]["train"] > 100 and source["documents"]["heldout"] >= 1
    assert read_tokens(out / "train").size > 100_000


def test_a_given_tokenizer_encodes_the_corpus(tmp_path, capsys):
    text_dir = _make_text_dir(tmp_path / "texts")
    assert _build(tmp_path / "first", text_dir) == 0
    given = tmp_path / "first" / "tokenizer.json"
    assert _build(tmp_path / "second", text_dir, "--tokenizer", str(given)) == 0
    manifest = json.loads((tmp_path / "second" / "manifest.json").read_text())
    assert manifest["tokenizer_given"] == str(given.absolute())
    assert manifest["vocab_size_requested"] is None
    # the same tokenizer and split: the same tokens
    assert np.array_equal(read_tokens(tmp_path / "second" / "heldout"),
                          read_tokens(tmp_path / "first" / "heldout"))
    capsys.readouterr()
