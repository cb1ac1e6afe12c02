"""Merge results files of the retention study run in parts (one device call each).

    python -m train.evaluation retention-merge PART.json [PART.json ...]
        --out results.json [--mixed-devices]

A study too long for one call runs as several, split by ``--lengths`` (the
64K documents cost most), ``--facts`` or ``--caches``, or as more documents
per cell under other ``--seed`` values (a file merged before is a part too: its
own parts are kept); the merge adds the counts of each
(cache, length, facts, depth) cell, recomputes the summaries and goals, and
keeps every part's configuration, timings and workers under ``parts``. The
parts must come from the same model (weights fingerprint), device kind and
study format; ``--mixed-devices`` lets the device kinds differ (for example
the short lengths on a CPU, the long ones on a GPU): the counts do not depend
on the device, and each part keeps its own device and timings. Exit codes: 0
done, 1 usage, 2 a part not found, 3 parts unreadable or disagreeing.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..cli import UsageParser, run_reporting_errors
from . import retention_scoring as scoring
from .retention_args import CACHES
from .retention_plot import load_results, markdown_table
from .retention_study import FORMAT
from .retention_workers import write_json


class MergeError(ValueError):
    """Parts that cannot be merged."""


def _check_same(parts: Sequence[dict[str, Any]], what: str, get) -> Any:
    values = [get(p) for p in parts]
    if any(v != values[0] for v in values[1:]):
        raise MergeError(f"the parts differ in {what}: {values}")
    return values[0]


def _open_failures(parts: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
                   ) -> dict[str, str]:
    """The parts' failures that no other part made up for: a cache that failed in a
    part stays failed unless another part measured it at every length of that part
    (each part keeps its own failures under ``parts``)."""
    measured = {(r["cache"], r["length"]) for r in rows}
    failures: dict[str, str] = {}
    for part in parts:
        lengths = part["config"]["lengths"]
        for cache, why in part.get("failures", {}).items():
            missing = [n for n in lengths if (cache, n) not in measured]
            if missing:
                failures[cache] = f"{why} (lengths {', '.join(map(str, missing))})"
    return failures


def _part_records(part: dict[str, Any]) -> list[dict[str, Any]]:
    """What the merged file keeps of ``part`` under ``parts``: its own record, or, for
    a file merged before, the records it already holds (so a merged study takes more
    documents by merging it again with a new part)."""
    if "parts" in part["config"]:
        return part["parts"]
    return [{"config": part["config"], "device": part["device"], "versions": part["versions"],
             "timings": part["timings"], "workers": part.get("workers", {}),
             "unbounded": part.get("unbounded", {}), "failures": part.get("failures", {})}]


def _documents(parts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts' document records joined by text (``scoring.document_records``): a
    document read by several parts holds the union of their caches; one cache
    answering a document in two parts would count it twice (``MergeError``). Parts
    written before the records existed are not checked."""
    joined: dict[str, dict[str, Any]] = {}
    for part in parts:
        for doc in part.get("documents", []):
            seen = joined.setdefault(doc["sha256"], doc | {"caches": []})
            twice = set(seen["caches"]) & set(doc["caches"])
            if twice:
                raise MergeError(
                    f"the {doc['length']}-token document (facts {doc['facts']}, depth "
                    f"{doc['depth']}, seed {doc['seed']}) is answered by "
                    f"{', '.join(sorted(twice))} in two parts: it would count twice")
            seen["caches"] = sorted(set(seen["caches"]) | set(doc["caches"]))
    return list(joined.values())


def merge(parts: Sequence[dict[str, Any]], *, mixed_devices: bool = False) -> dict[str, Any]:
    """One results dict from the ``parts`` (``MergeError`` when they disagree;
    their device kinds may differ with ``mixed_devices``)."""
    if not parts:
        raise MergeError("nothing to merge")
    _check_same(parts, "format", lambda p: p["format"])
    _check_same(parts, "model weights", lambda p: p["model"]["weights_sha256"])
    kinds = list(dict.fromkeys(p["device"]["kind"] for p in parts))
    if not mixed_devices:
        _check_same(parts, "device", lambda p: p["device"]["kind"])
    _check_same(parts, "corpus tokenizer", lambda p: p["corpus"]["tokenizer_sha256"])
    _check_same(parts, "scoring rule", lambda p: p.get("scoring", scoring.EXACT_RULE))
    cells: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    same: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for part in parts:
        for r in part["rows"]:
            cell = cells[r["cache"], r["length"], r["facts"], r["depth"]]
            cell[0] += r["correct"]
            cell[1] += r["total"]
        for a in part["agreement_with_unbounded"]:
            same[a["cache"], a["length"]][0] += a["same"]
            same[a["cache"], a["length"]][1] += a["total"]
    rows = [{"cache": cache, "length": length, "facts": facts, "depth": depth,
             "correct": c, "total": t, "accuracy": c / t}
            for (cache, length, facts, depth), (c, t) in sorted(
                cells.items(), key=lambda kv: (CACHES.index(kv[0][0]), *kv[0][1:]))]
    records = [record for p in parts for record in _part_records(p)]
    configs = [record["config"] for record in records]
    lengths = sorted({n for c in configs for n in c["lengths"]})
    tasks = {c.get("task", "facts") for c in configs}  # files before the chat task: facts
    if len(tasks) > 1:
        raise MergeError(f"the parts differ in task: {', '.join(sorted(tasks))}")
    documents = _documents(parts)
    per_cell = [r["total"] // r["facts"] for r in rows]
    config = {"task": tasks.pop(), "lengths": lengths,
              "depths": sorted({d for c in configs for d in c["depths"]}),
              "facts": sorted({f for c in configs for f in c["facts"]}),
              "caches": [c for c in CACHES if any(c in cfg["caches"] for cfg in configs)],
              "count": min(per_cell, default=0), "count_max": max(per_cell, default=0),
              "seeds": sorted({c["seed"] for c in configs}),
              "documents": sum(c["documents"] for c in configs),
              "questions_per_cache": sum(c["questions_per_cache"] for c in configs),
              "parts": configs}
    summary = scoring.summaries(rows, CACHES)
    state: dict[str, Any] = {}
    kv: dict[str, dict[str, int]] = {}
    for part in parts:
        for cache, value in part["state_bytes"].items():
            if cache.endswith("_kv_cache_bytes"):  # a full cache's bytes per length
                kv.setdefault(cache, {}).update(value)
            elif cache in state and state[cache]["model_cache_bytes"] != \
                    value["model_cache_bytes"]:
                raise MergeError(f"the parts' {cache} states differ in size")
            else:
                state.setdefault(cache, value)
    for cache, sizes in kv.items():
        state[cache] = dict(sorted(sizes.items(), key=lambda item: int(item[0])))
    ran = {length for p in parts for length in p.get("unbounded", {}).get("lengths", {})}
    unbounded = {
        "lengths": {k: v for p in parts for k, v in p.get("unbounded", {}).get("lengths",
                                                                               {}).items()},
        "skipped": [dict(k) for k in dict.fromkeys(
            tuple(sorted(s.items())) for p in parts
            for s in p.get("unbounded", {}).get("skipped", []) if str(s["length"]) not in ran)],
        "cached_path_checks": [r["unbounded"]["cached_path_check"] for r in records
                               if "cached_path_check" in r["unbounded"]]}
    first = parts[0]
    device = first["device"] if len(kinds) == 1 else {"kind": " + ".join(kinds),
                                                      "parts": [p["device"] for p in parts]}
    return {"format": FORMAT, "device": device, "versions": first["versions"],
            "model": first["model"], "corpus": first["corpus"],
            "scoring": first.get("scoring", scoring.EXACT_RULE), "config": config,
            "rows": rows, "summaries": summary,
            "goals": scoring.goals(summary, lengths, task=config["task"], state_bytes=state),
            "agreement_with_unbounded": [
                {"cache": cache, "length": length, "same": s, "total": t, "fraction": s / t}
                for (cache, length), (s, t) in sorted(same.items(), key=lambda kv: (
                    CACHES.index(kv[0][0]), kv[0][1]))],
            "documents": documents,
            "state_bytes": state, "unbounded": unbounded,
            "parts": records,
            "failures": _open_failures(parts, rows),
            "timings": {"total_s": sum(p["timings"]["total_s"] for p in parts)},
            "samples": [s for p in parts for s in p.get("samples", [])]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.evaluation retention-merge``: merge the parts into ``--out``
    and print the tables; 2 for a part not found, 3 for unreadable or
    disagreeing parts (1 for a usage error)."""
    parser = UsageParser(prog="python -m train.evaluation retention-merge", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", metavar="PART.json",
                        help="results files of python -m train.evaluation retention")
    parser.add_argument("--out", required=True, help="the merged results JSON")
    parser.add_argument("--mixed-devices", action="store_true",
                        help="merge parts run on different device kinds")
    args = parser.parse_args(argv)

    def run() -> int:
        try:
            merged = merge([load_results(p) for p in args.parts],
                           mixed_devices=args.mixed_devices)
        except KeyError as err:
            raise MergeError(f"a part lacks the field {err}") from None
        write_json(Path(args.out), merged)
        print(f"wrote {args.out} ({len(args.parts)} parts)")
        print(markdown_table(merged))
        print(scoring.goals_line(merged["goals"]))
        return 0

    return run_reporting_errors(run)
