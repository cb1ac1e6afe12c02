"""Greedy answers of an unbounded model (full KV cache) to questions about documents.

The neural database only takes bounded models, so the retention study's
unbounded arm runs here, on ``train.steps.unbounded_twin(model)``, in a
process of its own (``worker``, beside the product path's ingest), through
the engine's preallocated K/V cache (``coda_jax.KVCache``): each document is
read once into a cache of one row (``model.prefill`` with its true length;
the documents of one length are padded to a shared length, one compilation,
and the padding is never written), and each question is then answered from
its document's row: the batch's rows are concatenated (``concat_rows``), the
prompts in the model's template read after them at each document's true
positions (``prefill(..., lengths=..., last_only=True)``), and
``coda_jax.generate`` answers greedily to a stop token or the answer length
(one compiled loop per batch shape). :func:`check_against_forward` compares
the cached path with the model's own forward (``CausalLM.__call__``); the arm
runs that check on its device first (:func:`cached_path_check`).

The study's ``base`` arm runs here too: the unmodified base model (an adapter
bundle's pinned base, or a given checkpoint, :func:`open_base`) in place of the
twin, with the model's framing, prompt and stop tokens.

The study starts the worker (``retention_workers.start_worker``):

    python -m train.evaluation.retention_unbounded worker SPEC.json ANSWERS.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

IMPORTED_AT = time.perf_counter()  # a worker's imports are timed from here
if __name__ == "__main__":  # a worker shares the GPU with the study's other processes
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from coda_jax import CausalLM, KVCache, concat_rows, generate  # noqa: E402
from coda_jax.segments import default_chunks_per_call  # noqa: E402

from .retention_workers import worker_main, write_json  # noqa: E402

WORKER_FORMAT = "retention_study.unbounded_worker/1"
WORKER_MODULE = f"{__package__}.retention_unbounded"  # python -m WORKER_MODULE worker ...
CHECK_TOKENS = 500  # the cached path's check: a document's first tokens (not a multiple of 256)
DOC_PAD_MULTIPLE = 256  # documents of one length are padded to a multiple of this
SUFFIX_MULTIPLE = 16
DOC_BLOCK = 1024  # a document is read in blocks of this many tokens (at most)
# A document call's float32 attention scores at most (the engine's XLA path holds
# block x blocks-per-call x cache length x heads of them, twice for differential
# attention): a 64K document is read one block per call.
DOC_SCORE_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class Question:
    """One question about one document: ``doc`` indexes the documents given."""

    doc: int
    text: str


@dataclasses.dataclass(frozen=True)
class UnboundedAnswer:
    """A greedy answer: its text, its tokens (without the stop token), whether a
    stop token ended it, and how many tokens its document had."""

    text: str
    tokens: list[int]
    stopped: bool
    doc_tokens: int


def kv_cache_bytes(model: CausalLM, tokens: int) -> int:
    """Bytes of the full K/V cache of ``tokens`` tokens (one document):
    layers x 2 (K and V) x tokens x KV heads x head_dim x the weights' bytes."""
    cfg = model.cfg
    itemsize = jnp.dtype(model_dtype(model)).itemsize
    return int(cfg.num_layers * 2 * tokens * cfg.num_kv_heads * cfg.head_dim * itemsize)


def model_dtype(model: CausalLM) -> Any:
    """The dtype of the model's weights: that of its K/V cache."""
    return model.embed_tokens.embedding[...].dtype


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def read_document(model: CausalLM, ids: Sequence[int], *, padded: int, max_length: int
                  ) -> KVCache:
    """A cache of one row and ``max_length`` positions holding the document ``ids``
    (read as a row of ``padded`` tokens, the padding neither written nor counted)."""
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :len(ids)] = ids
    block = min(DOC_BLOCK, padded)
    per_block = 4 * 2 * block * max_length * model.cfg.num_heads
    chunks = max(1, min(default_chunks_per_call(block), DOC_SCORE_BYTES // per_block))
    cache = model.init_state(1, model_dtype(model), max_length=max_length)
    _, cache = model.prefill(jnp.asarray(tokens), cache, block_size=block,
                             chunks_per_call=chunks, lengths=np.asarray([len(ids)], np.int32),
                             last_only=True)
    return cache


def suffix_logits(model: CausalLM, document: Sequence[int], suffix: Sequence[int]
                  ) -> np.ndarray:
    """Logits (S, V) of ``suffix`` read after ``document`` through the cached path
    (the document padded as the study pads it, then the suffix read into the
    same cache): what :func:`answer_questions` computes for a prompt."""
    padded = round_up(len(document), DOC_PAD_MULTIPLE)
    width = round_up(len(suffix), SUFFIX_MULTIPLE)
    cache = read_document(model, document, padded=padded, max_length=padded + width)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(suffix)] = suffix
    logits, _ = model.prefill(jnp.asarray(tokens), cache, block_size=width,
                              lengths=np.asarray([len(suffix)], np.int32))
    return np.asarray(logits[0, :len(suffix)])


def compare_with_forward(model: CausalLM, document: Sequence[int], suffix: Sequence[int]
                         ) -> dict[str, float]:
    """:func:`suffix_logits` against the model's own forward over document + suffix
    at the suffix's positions: the largest absolute difference, the largest
    absolute logit of the forward (the scale), and whether both pick the same
    greedy token at every position."""
    full = model.forward_logits(jnp.asarray([list(document) + list(suffix)], jnp.int32))
    want = np.asarray(full[0, len(document):], np.float32)
    got = np.asarray(suffix_logits(model, document, suffix), np.float32)
    return {"max_abs_difference": float(np.max(np.abs(got - want))),
            "max_abs_logit": float(np.max(np.abs(want))),
            "same_argmax_fraction": float(np.mean(got.argmax(-1) == want.argmax(-1)))}


def check_against_forward(model: CausalLM, document: Sequence[int], suffix: Sequence[int]
                          ) -> float:
    """Largest absolute difference between :func:`suffix_logits` and the model's own
    forward over document + suffix at the suffix's positions."""
    return compare_with_forward(model, document, suffix)["max_abs_difference"]


MAX_BATCH_TOKENS = 1 << 21  # document tokens of K/V per call at most (a GPU's default)
MEMORY_SHARE = 8  # the default keeps a call's K/V within 1/MEMORY_SHARE of the memory


def device_memory_bytes() -> int:
    """The first device's memory: a GPU's allocator limit, else the host's RAM."""
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_batch_tokens(model: CausalLM, memory_bytes: int | None = None) -> int:
    """Document tokens of K/V per call whose cache fits in 1/``MEMORY_SHARE`` of
    ``memory_bytes`` (default :func:`device_memory_bytes`), at most
    ``MAX_BATCH_TOKENS``: a CPU host gets calls its RAM holds (SmolLM2's float32 K/V
    at 2M tokens is 96 GB; the system kills a process that asks for it)."""
    memory = device_memory_bytes() if memory_bytes is None else memory_bytes
    return max(1, min(MAX_BATCH_TOKENS, memory // MEMORY_SHARE // kv_cache_bytes(model, 1)))


def rows_per_batch(padded_length: int, batch_tokens: int, most: int = 64) -> int:
    """Question rows per compiled call: the K/V of ``batch_tokens`` document tokens
    at most (each row carries its document's cache), between 1 and ``most``."""
    return max(1, min(most, batch_tokens // max(padded_length, 1)))


def answer_questions(model: CausalLM, tokenizer: Any, documents: Sequence[str],
                     questions: Sequence[Question], *, prompt: str, stop_tokens: Sequence[int],
                     max_new_tokens: int, batch_tokens: int = MAX_BATCH_TOKENS,
                     progress: bool = True, desc: str = "unbounded"
                     ) -> tuple[list[UnboundedAnswer], dict[str, float]]:
    """Greedy answers of the unbounded ``model`` to ``questions`` (in their order)
    about ``documents`` (texts tokenised as the database tokenises them: special
    tokens before the document, none around the prompt), and the seconds spent
    reading documents (``prefill_s``) and generating (``generate_s``).

    ``prompt`` is the model's template with a ``{question}`` field. Documents
    are read in order and their caches kept only while their questions wait;
    call once per document length (one compilation per padded length). Each
    cache has room for its document (padded), the longest prompt and the answer.
    """
    if not documents:
        return [], {"prefill_s": 0.0, "generate_s": 0.0}
    doc_ids = [np.asarray(tokenizer.encode(text).ids, np.int32) for text in documents]
    padded = round_up(max(len(ids) for ids in doc_ids), DOC_PAD_MULTIPLE)
    prompts = [np.asarray(tokenizer.encode(prompt.replace("{question}", q.text),
                                           add_special_tokens=False).ids, np.int32)
               for q in questions]
    width = round_up(max(len(p) for p in prompts), SUFFIX_MULTIPLE)
    max_length = padded + round_up(width + max_new_tokens, SUFFIX_MULTIPLE)
    rows = rows_per_batch(max_length, batch_tokens)
    stops = tuple(int(t) for t in stop_tokens)
    by_doc: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        by_doc.setdefault(q.doc, []).append(i)
    answers: list[UnboundedAnswer | None] = [None] * len(questions)
    caches: dict[int, KVCache] = {}
    waiting: list[int] = []
    timings = {"prefill_s": 0.0, "generate_s": 0.0}

    def read(doc: int) -> None:
        start = time.perf_counter()
        caches[doc] = jax.block_until_ready(
            read_document(model, doc_ids[doc], padded=padded, max_length=max_length))
        timings["prefill_s"] += time.perf_counter() - start

    def run(batch: list[int]) -> None:
        chosen = batch + [batch[-1]] * (rows - len(batch))  # a fixed batch: one compile
        docs = [questions[i].doc for i in chosen]
        suffix = np.zeros((rows, width), np.int32)
        for row, i in enumerate(chosen):
            suffix[row, :len(prompts[i])] = prompts[i]
        start = time.perf_counter()
        cache = concat_rows(*(caches[d] for d in docs))
        logits, cache = model.prefill(
            jnp.asarray(suffix), cache, block_size=width,
            lengths=np.asarray([len(prompts[i]) for i in chosen], np.int32), last_only=True)
        tokens, counts, _ = generate(model, cache, logits, max_new_tokens=max_new_tokens,
                                     stop_tokens=stops)
        tokens, counts = np.asarray(tokens), np.asarray(counts)
        timings["generate_s"] += time.perf_counter() - start
        for row, i in enumerate(batch):
            ids = tokens[row, :counts[row]].tolist()
            stopped = bool(ids) and ids[-1] in stops
            ids = ids[:-1] if stopped else ids
            answers[i] = UnboundedAnswer(
                text=tokenizer.decode(ids, skip_special_tokens=True), tokens=ids,
                stopped=stopped, doc_tokens=len(doc_ids[questions[i].doc]))

    def release() -> None:
        pending = {questions[i].doc for i in waiting}
        for doc in [d for d in caches if d not in pending]:
            del caches[doc]

    for doc in tqdm(sorted(by_doc), desc=desc, disable=not progress, leave=False):
        read(doc)
        waiting += by_doc[doc]
        while len(waiting) >= rows:
            run(waiting[:rows])
            waiting = waiting[rows:]
            release()
    if waiting:
        run(waiting)
    return [a for a in answers if a is not None], timings


# ------------------------------------------------------------------ the study's arm
def is_out_of_memory(err: Exception) -> bool:
    """Whether an XLA error says the device ran out of memory."""
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def framed(settings: Any, text: str) -> str:
    """A document as the database reads it: inside the model's document framing (a
    chat model's turn markers, ``document_prefix`` and ``document_suffix``; empty for a
    plain model), so the full cache reads what the bounded state read."""
    return settings.document_prefix + text + settings.document_suffix


def cached_path_check(twin: CausalLM, opened: Any, doc: dict[str, Any],
                      tokens: int = CHECK_TOKENS) -> dict[str, Any]:
    """The cached path against the model's own forward, on this device and in
    the model's dtype: the first ``tokens`` tokens of ``doc``, then its first
    question in the prompt with the answer, padded (with token 0) to a
    multiple of ``SUFFIX_MULTIPLE`` as the arm pads its prompts."""
    ids = opened.tokenizer.encode(framed(opened.settings, doc["text"])).ids[:tokens]
    q = doc["questions"][0]
    suffix = opened.tokenizer.encode(
        opened.settings.prompt.replace("{question}", q["question"]) + " " + q["answer"],
        add_special_tokens=False).ids
    suffix += [0] * (-len(suffix) % SUFFIX_MULTIPLE)
    start = time.perf_counter()
    found = compare_with_forward(twin, ids, suffix)
    return {"document_tokens": len(ids), "suffix_tokens": len(suffix), **found,
            "seconds": time.perf_counter() - start}


def open_base(opened: Any, base: str) -> CausalLM:
    """The unmodified base of ``opened``: ``"pinned"`` the pinned base of the adapter
    bundle ``opened`` came from, else the coda_jax checkpoint at ``base``;
    ``ValueError`` when its tokenizer is not ``opened``'s."""
    from coda_jax import load_model
    from coda_db.adapter_bundle import BasePin, load_base, read_adapter_card
    from coda_db.model_source import load_tokenizer, tokenizer_fingerprint

    if base == "pinned":
        card = read_adapter_card(opened.path)
        model, _ = load_base(BasePin.from_card(card, opened.path),
                             expected_tokenizer=opened.tokenizer_sha256)
        return model
    if tokenizer_fingerprint(load_tokenizer(base)) != opened.tokenizer_sha256:
        raise ValueError(f"the base model at {base} has another tokenizer than {opened.path}")
    return load_model(base)


def run_arm(opened: Any, docs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], *,
            lengths: Sequence[int], max_length: int, batch_tokens: int | None, progress: bool,
            model: CausalLM | None = None
            ) -> tuple[list[str | None], dict[str, Any], dict[int, int]]:
    """The study's unbounded cache: the greedy answers of ``opened``'s unbounded
    twin (or of ``model``, in ``opened``'s framing and prompt: the base arm) to
    the ``rows`` (``doc``, ``length``, ``question``; None where a length
    was skipped: above ``max_length``, or at and after one that ran out of device
    memory or failed); the report (the cached path's check, per length its timings, the
    skipped lengths, the K/V cache's bytes per length); each document's tokens."""
    from ..steps import unbounded_twin
    from . import retention_product as product

    twin = product.same_weights_twin(opened.model, unbounded_twin) if model is None else model
    batch_tokens = batch_tokens or default_batch_tokens(twin)
    settings = opened.settings
    answers: list[str | None] = [None] * len(rows)
    report: dict[str, Any] = {"lengths": {}, "skipped": [], "batch_tokens": batch_tokens,
                              "cached_path_check": cached_path_check(twin, opened, docs[0])}
    doc_tokens: dict[int, int] = {}
    too_long = False
    for length in lengths:
        if length > max_length or too_long:
            why = (f"longer than --unbounded-max-length {max_length}" if length > max_length
                   else "a shorter length did not run (out of memory or failed)")
            report["skipped"].append({"length": length, "reason": why})
            continue
        picked = [i for i, r in enumerate(rows) if r["length"] == length]
        doc_ids = sorted({rows[i]["doc"] for i in picked})
        local = {d: j for j, d in enumerate(doc_ids)}
        questions = [Question(doc=local[rows[i]["doc"]], text=rows[i]["question"])
                     for i in picked]
        start = time.perf_counter()
        try:
            got, timings = answer_questions(
                twin, opened.tokenizer, [framed(settings, docs[d]["text"]) for d in doc_ids],
                questions,
                prompt=settings.prompt, stop_tokens=settings.stop_tokens,
                max_new_tokens=settings.sampling.max_new_tokens, batch_tokens=batch_tokens,
                progress=progress, desc=f"unbounded {length}")
        except Exception as err:  # noqa: BLE001 (XLA's errors have no common class)
            # Recorded, and the longer lengths skipped: the shorter ones' answers stand.
            what = "out of device memory" if is_out_of_memory(err) else \
                f"failed ({type(err).__name__})"
            first = (str(err).splitlines() or [""])[0][:300]
            print(f"unbounded {length}: {what}: {first}", file=sys.stderr, flush=True)
            report["skipped"].append({"length": length, "reason": f"{what}: {first}"})
            too_long = True
            continue
        for i, answer in zip(picked, got, strict=True):
            answers[i] = answer.text
        doc_tokens |= {rows[i]["doc"]: a.doc_tokens for i, a in zip(picked, got)}
        report["lengths"][str(length)] = timings | {
            "total_s": time.perf_counter() - start, "questions": len(picked),
            "documents": len(doc_ids),
            "mean_doc_tokens": sum(doc_tokens[d] for d in doc_ids) / len(doc_ids)}
    report["kv_cache_bytes"] = {str(length): kv_cache_bytes(twin, length)
                                for length in lengths}
    return answers, report, doc_tokens


def write_spec(path: Path, *, model: str | os.PathLike, documents: str | os.PathLike,
               rows: Sequence[dict[str, Any]], lengths: Sequence[int], max_length: int,
               batch_tokens: int | None, progress: bool, base: str | None = None) -> Path:
    """The worker's instructions: ``documents`` is a JSON list of the study's
    documents (``text``, ``questions``), ``rows`` its question rows; ``base``
    (:func:`open_base`) makes it the base arm."""
    spec = {"format": WORKER_FORMAT, "model": str(model), "base": base,
            "documents": str(documents),
            "rows": [{k: r[k] for k in ("doc", "length", "question")} for r in rows],
            "lengths": list(lengths), "max_length": int(max_length),
            "batch_tokens": batch_tokens and int(batch_tokens), "progress": bool(progress)}
    path.write_text(json.dumps(spec))
    return path


def run_worker(spec_path: str | os.PathLike, answers_path: str | os.PathLike) -> int:
    """Open the model, run :func:`run_arm` on the spec's documents and rows, write
    the answers, the report, each document's tokens and the timings."""
    from coda_db.model_source import open_model

    started = time.perf_counter()
    timings = {"imports_s": started - IMPORTED_AT}
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("format") != WORKER_FORMAT:
        raise ValueError(f"{spec_path} is not an unbounded worker spec")
    docs = json.loads(Path(spec["documents"]).read_text())
    opened = open_model(spec["model"])
    base = open_base(opened, spec["base"]) if spec.get("base") else None
    timings["open_s"] = time.perf_counter() - started
    answers, report, tokens = run_arm(opened, docs, spec["rows"], lengths=spec["lengths"],
                                      max_length=spec["max_length"],
                                      batch_tokens=spec["batch_tokens"],
                                      progress=spec["progress"], model=base)
    per_length = report["lengths"].values()
    timings |= {"prefill_s": sum(t["prefill_s"] for t in per_length),
                "generate_s": sum(t["generate_s"] for t in per_length),
                "total_s": time.perf_counter() - IMPORTED_AT}
    out = {"format": WORKER_FORMAT, "answers": answers, "report": report,
           "doc_tokens": {str(k): v for k, v in tokens.items()}, "timings": timings,
           "device": jax.devices()[0].device_kind}
    write_json(Path(answers_path), out, indent=None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``worker SPEC ANSWERS``: the study's unbounded arm in a process of its own."""
    return worker_main(argv, run_worker, WORKER_MODULE)


if __name__ == "__main__":
    sys.exit(main())
