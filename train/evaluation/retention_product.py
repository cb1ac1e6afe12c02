"""The retention study's product path: documents through ``coda_db``.

``ingest_library`` reads every document with ``NeuralDatabase.ingest`` and
saves its state into a library (one entry per document); the questions are
then asked in a fresh process, which opens the library, loads the states and
answers with ``query_many`` (greedy; the model's prompt, stop tokens and
answer length), in batches of a fixed size (the last one padded: one
compilation). That process is this module's worker entry point, which the
study starts (``retention_workers.start_worker``):

    python -m train.evaluation.retention_product worker SPEC.json ANSWERS.json

SPEC names the model, the library and the (label, question) rows. ``window_only_model`` writes the
model with its banks removed (only the recent window left) as a checkpoint of
its own, carrying the same query settings and tokenizer, so it runs through
the identical path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __name__ == "__main__":  # a worker shares the GPU with the study's own process
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from tqdm import tqdm  # noqa: E402

from .retention_workers import worker_main, write_json  # noqa: E402

WORKER_FORMAT = "retention_study.worker/1"
WORKER_MODULE = f"{__package__}.retention_product"  # python -m WORKER_MODULE worker ...
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class IngestReport:
    """What ingesting documents into a library cost and produced: the labels (one
    per document, in order), tokens read per document, the state's bytes in
    memory and on disk per document, the model's own state size
    (``cache_bytes``), and seconds."""

    labels: list[str]
    tokens: list[int]
    bytes_in_memory: list[int]
    bytes_on_disk: list[int]
    model_cache_bytes: int
    ingest_s: float
    save_s: float
    open_s: float


def document_label(index: int) -> str:
    """The library label of the study's ``index``-th document."""
    return f"doc{index:05d}"


def model_state_bytes(model: Any, dtype: Any) -> int:
    """The whole model's state for one document, from the bounded layers'
    ``cache_bytes`` (every layer shares one configuration)."""
    per_layer = model.layers.self_attn.cache_bytes(batch_size=1, dtype=dtype)
    return int(model.cfg.num_layers * per_layer)


def ingest_library(model: Any, library: str | os.PathLike, texts: Sequence[str], *,
                   progress: bool = True, desc: str = "ingest") -> IngestReport:
    """Ingest each text with ``NeuralDatabase`` on ``model`` (a model directory or
    an opened model) and save its state under :func:`document_label` in
    ``library``."""
    from coda_db import NeuralDatabase

    start = time.perf_counter()
    db = NeuralDatabase(model, library=library)
    open_s = time.perf_counter() - start
    labels, tokens, memory, disk = [], [], [], []
    ingest_s = save_s = 0.0
    dtype = None
    for i, text in enumerate(tqdm(texts, desc=desc, disable=not progress, leave=False)):
        label = document_label(i)
        start = time.perf_counter()
        document = db.ingest(text, source=label)
        middle = time.perf_counter()
        db.save(label, document)
        save_s += time.perf_counter() - middle
        ingest_s += middle - start
        info = db.info(label)
        labels.append(label)
        tokens.append(int(document.tokens))
        memory.append(int(info["bytes_in_memory"]))
        disk.append(int(info["bytes_on_disk"]))
        dtype = document.state.k_buf.dtype
    cache = model_state_bytes(db.opened.model, dtype) if dtype is not None else 0
    return IngestReport(labels=labels, tokens=tokens, bytes_in_memory=memory,
                        bytes_on_disk=disk, model_cache_bytes=cache, ingest_s=ingest_s,
                        save_s=save_s, open_s=open_s)


# What the database can save: Orbax refuses the zero-size arrays of a state without
# banks, so the window-only model keeps one slot per bank that nothing is ever
# written to (no write candidates): masked as unused, it attends over the window
# alone, as with_bank(model, num_landmarks_exact=0, num_landmarks_summary=0) does.
# No attention sinks either: they live in the exact bank.
WINDOW_ONLY_BANK = dict(num_landmarks_exact=1, num_landmarks_summary=1, sink_tokens=0,
                        exact_candidates_per_block=0, summary_candidates_per_block=0)
NO_BANKS = dict(num_landmarks_exact=0, num_landmarks_summary=0, sink_tokens=0)


def same_weights_twin(model: Any, build: Any) -> Any:
    """``build(model)`` (``model``'s weights under another attention spec, e.g.
    ``train.steps.with_bank``) without running the bounded model's constructor,
    which takes seconds of eager work on a CPU: the twin's structure from
    ``nnx.eval_shape``, each of its parameters ``model``'s at the same path. Falls
    back to ``build(model)`` when the twin has a parameter ``model`` lacks."""
    from flax import nnx

    from ..steps import param_paths

    try:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: build(model)))
        source = param_paths(model)
        filled = []
        for path, var in nnx.to_flat_state(state):
            want = var.get_value()
            have = source.get(path)
            if have is None or have[...].shape != want.shape:
                return build(model)
            filled.append((path, var.replace(have[...].astype(want.dtype))))
        return nnx.merge(graphdef, nnx.from_flat_state(filled))
    except AttributeError:  # another flax's state API
        return build(model)


def window_only_twin(model: Any, *, saveable: bool = True) -> Any:
    """``model``'s weights attending over its recent window only: without banks
    (``saveable=False``), or with the never-written one-slot banks of
    ``WINDOW_ONLY_BANK`` that a library can save (the same answers)."""
    from ..steps import with_bank

    if saveable and not model.spec.bank.mask_unused_memory:
        # The one-slot banks would then be attended to (their initial contents).
        raise ValueError("the window-only twin needs mask_unused_memory=True (this model "
                         "attends to unused bank slots)")
    bank = WINDOW_ONLY_BANK if saveable else NO_BANKS
    return same_weights_twin(model, lambda m: with_bank(m, **bank))


def window_only_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      model: Any = None, tokenizer: Any = None) -> Path:
    """The model at ``model_dir`` (``model``: the same, already loaded) attending
    over its window only (:func:`window_only_twin`), saved at ``out_dir`` as a
    checkpoint with the same ``database`` settings and tokenizer. ``model_dir`` may
    be a bundle of adapters (its card's settings; its opened ``model`` and
    ``tokenizer`` are then needed, the bundle holding neither whole)."""
    from coda_jax import load_model, read_model_metadata, save_model
    from coda_db.bundled import is_adapter_bundle, read_card
    from coda_db.settings import METADATA_KEY

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    bundle = is_adapter_bundle(model_dir)
    if bundle and (model is None or tokenizer is None):
        raise ValueError(f"{model_dir} is a bundle of adapters: give its opened model and "
                         "tokenizer")
    meta = (read_card(model_dir) or {}) if bundle else read_model_metadata(model_dir)
    extra = {METADATA_KEY: meta[METADATA_KEY]} if meta.get(METADATA_KEY) else {}
    model = load_model(model_dir) if model is None else model
    save_model(out_dir, window_only_twin(model), extra_meta=extra)
    if bundle:
        tokenizer.save(str(out_dir / TOKENIZER_FILE))
    else:
        shutil.copy(model_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    return out_dir


# ------------------------------------------------------------------ the fresh process
def write_spec(path: Path, *, model: str | os.PathLike, library: str | os.PathLike,
               rows: Sequence[tuple[str, str]], batch_size: int, progress: bool) -> Path:
    """The worker's instructions: ``rows`` are (label, question) pairs."""
    spec = {"format": WORKER_FORMAT, "model": str(model), "library": str(library),
            "rows": [list(r) for r in rows], "batch_size": int(batch_size),
            "progress": bool(progress)}
    path.write_text(json.dumps(spec))
    return path


def run_worker(spec_path: str | os.PathLike, answers_path: str | os.PathLike) -> int:
    """Open the library, load every state named in the spec, answer every row
    greedily with ``query_many`` in fixed-size batches; write the answers and
    the timings (``imports_s``: jax and the database)."""
    started = time.perf_counter()
    import jax

    from coda_db import NeuralDatabase

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("format") != WORKER_FORMAT:
        raise ValueError(f"{spec_path} is not a retention worker spec")
    timings = {"imports_s": time.perf_counter() - started}
    start = time.perf_counter()
    db = NeuralDatabase(spec["model"], library=spec["library"])
    timings["open_s"] = time.perf_counter() - start
    rows = spec["rows"]
    progress = spec["progress"]

    start = time.perf_counter()
    labels = sorted({label for label, _ in rows})
    states = {label: db.load(label) for label in tqdm(labels, desc="load states",
                                                      disable=not progress, leave=False)}
    jax.block_until_ready([s.state for s in states.values()])
    timings["load_s"] = time.perf_counter() - start

    batch = max(1, min(int(spec["batch_size"]), len(rows)))
    answers: list[dict[str, Any]] = []
    start = time.perf_counter()
    for at in tqdm(range(0, len(rows), batch), desc="query_many", disable=not progress,
                   leave=False):
        chunk = rows[at:at + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # one batch shape: one compile
        got = db.query_many([q for _, q in padded], [states[label] for label, _ in padded],
                            temperature=0.0)
        answers += [{"text": a.text, "tokens": len(a.tokens), "stopped": a.stopped}
                    for a in got[:len(chunk)]]
    timings["query_s"] = time.perf_counter() - start
    timings["questions_per_s"] = len(rows) / max(timings["query_s"], 1e-9)
    timings["total_s"] = time.perf_counter() - started
    sampling = db.opened.settings.sampling.with_overrides(temperature=0.0)
    out = {"format": WORKER_FORMAT, "answers": answers, "timings": timings,
           "batch_size": batch, "states_loaded": len(states),
           "sampling": dataclasses.asdict(sampling),
           "prompt": db.opened.settings.prompt,
           "stop_tokens": list(db.opened.settings.stop_tokens),
           "device": jax.devices()[0].device_kind}
    write_json(Path(answers_path), out, indent=None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``worker SPEC ANSWERS``: the fresh-process half of the product path."""
    return worker_main(argv, run_worker, WORKER_MODULE)


if __name__ == "__main__":
    sys.exit(main())
