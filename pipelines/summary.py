"""Summarise: the run's counts, label and split counts, file totals and failure reasons, as combiners.

Applied to the run's valid commit records (what an interrupted earlier attempt committed plus what
this pipeline committed), on workers; the result is one small dict of constant size per run,
which the final step turns into run.json. Each commit record is totalled where it is made and
each bucket of per-item flags where it is grouped; only those accumulators are brought together
(`pipelines.combine.CombineToOne`), on every runner, whether it lifts combiners or not.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any, Iterable, Iterator

import apache_beam as beam

from export.commit import ITEM_STAGES
from pipelines import portable
from pipelines.combine import CombineToOne, JoinSingletons

ROW, DEAD = 1, 2  # item flags: has committed rows, has dead letters


def reason_of(dead: dict[str, Any]) -> str:
    return f"{dead['stage']}: {dead.get('reason') or dead['error_type']}"


class CommitTotalsFn(beam.CombineFn):
    """Commit records -> records, audio seconds, labels, splits, files and failure reasons."""

    def __init__(self, n_extractors: int):
        self.n_extractors = n_extractors

    def create_accumulator(self) -> dict[str, Any]:
        return {
            "records": 0,
            "seconds": 0.0,
            "labels": collections.Counter(),
            "splits": collections.Counter(),
            "files": {},  # kind -> [files, bytes]
            "by_stage": collections.Counter(),
            "reasons": {},  # reason -> [count, example key, example message]
            "list_failed": 0,  # list-stage dead letters that stand for unlisted items
            "fully_reused": 0,
            "partly_reused": 0,
        }

    def add_input(self, acc: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        for kind, entry in record["files"].items():
            totals = acc["files"].setdefault(kind, [0, 0])
            totals[0] += 1
            totals[1] += entry["bytes"]
        for row in record.get("rows", ()):
            acc["records"] += 1
            acc["seconds"] += row["seconds"]
            acc["labels"][row["label"]] += 1
            acc["splits"][row["split"]] += 1
            reused = len(row.get("reused", ()))
            acc["fully_reused"] += reused == self.n_extractors
            acc["partly_reused"] += 0 < reused < self.n_extractors
        for dead in record.get("dead", ()):
            acc["by_stage"][dead["stage"]] += 1
            acc["list_failed"] += dead["stage"] == "list" and dead.get("reason") != "duplicate_key"
            _add_reason(acc["reasons"], reason_of(dead), 1, dead["key"], dead["message"])
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, Any]]) -> dict[str, Any]:
        accs = iter(accs)
        out = next(accs)
        for acc in accs:
            for name in ("records", "seconds", "list_failed", "fully_reused", "partly_reused"):
                out[name] += acc[name]
            for name in ("labels", "splits", "by_stage"):
                out[name].update(acc[name])
            for kind, (count, size) in acc["files"].items():
                totals = out["files"].setdefault(kind, [0, 0])
                totals[0] += count
                totals[1] += size
            for reason, (count, key, message) in acc["reasons"].items():
                _add_reason(out["reasons"], reason, count, key, message)
        return out

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        reasons = sorted(acc["reasons"].items(), key=lambda kv: (-kv[1][0], kv[0]))
        return {
            "records": acc["records"],
            "audio_seconds": round(acc["seconds"], 6),
            "label_counts": dict(sorted(acc["labels"].items())),
            "split_counts": dict(sorted(acc["splits"].items())),
            "files": {kind: {"files": n, "bytes": b} for kind, (n, b) in sorted(acc["files"].items())},
            "failures": {
                "failed_records": sum(acc["by_stage"].values()),
                "by_stage": dict(sorted(acc["by_stage"].items())),
                "reasons": [{"reason": r, "count": n, "example": message} for r, (n, _, message) in reasons],
            },
            "list_failed": acc["list_failed"],
            "records_fully_reused": acc["fully_reused"],
            "records_partly_reused": acc["partly_reused"],
        }


def _add_reason(reasons: dict, reason: str, count: int, key: str, message: str) -> None:
    """Count `reason`; its example is the message of the smallest key, so any merge order agrees."""
    entry = reasons.get(reason)
    if entry is None:
        reasons[reason] = [count, key, message]
        return
    entry[0] += count
    if key < entry[1]:
        entry[1], entry[2] = key, message


class ItemTotalsFn(beam.CombineFn):
    """Per-item flags -> items ok (some record written), failed (some dead letter), and both."""

    def create_accumulator(self):
        return [0, 0, 0]

    def add_input(self, acc, flags: int):
        acc[0] += bool(flags & ROW)
        acc[1] += bool(flags & DEAD)
        acc[2] += flags == ROW | DEAD
        return acc

    def merge_accumulators(self, accs):
        return [sum(values) for values in zip(*accs)]

    def extract_output(self, acc) -> dict[str, int]:
        return {"ok": acc[0], "failed": acc[1], "partial": acc[2]}


def item_digest(item_key: str) -> bytes:
    """16 bytes standing for an item key in the per-item shuffle (a third of a typical key's
    size; two keys of a run share a digest with odds below 1e-20)."""
    return hashlib.blake2b(item_key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _flags(record: dict[str, Any]):
    flags: dict[str, int] = {}
    for row in record.get("rows", ()):
        flags[row["item_key"]] = flags.get(row["item_key"], 0) | ROW
    for dead in record.get("dead", ()):
        key = dead.get("item_key") or dead["key"]
        flags[key] = flags.get(key, 0) | DEAD
    for item_key, flag in flags.items():  # once per item and commit: a segmented item has many rows
        yield item_digest(item_key), flag


class SummariseRun(beam.PTransform):
    """Valid commit records -> one summary dict (see `CommitTotalsFn` and `ItemTotalsFn`).

    Applied to a tuple of PCollections of commit records (an earlier attempt's, this attempt's
    rows and dead letters), it summarises them all without flattening the records: each record is
    totalled where it is made (a commit is already a batch of rows or dead letters), and only
    accumulators and per-item flags (a digest of the item key and a flag, packed and compressed)
    cross a shuffle. An item's rows and dead letters may lie in several commits, so counting
    items needs the flags grouped by item; each bucket of that grouping gives one accumulator.
    FnApiRunner holds whatever crosses between stages in the launcher; whole records would be
    ~220 bytes an item.
    """

    def __init__(self, *, n_extractors: int):
        super().__init__()
        self.n_extractors = n_extractors

    def expand(self, commits):
        sets = tuple(commits) if isinstance(commits, (tuple, list)) else (commits,)
        totals = sets | "Totals" >> CombineToOne(CommitTotalsFn(self.n_extractors), inputs=_one)
        flags = tuple(pcoll | f"ItemFlags{i}" >> beam.FlatMap(_flags) for i, pcoll in enumerate(sets))
        # Grouped as packed bytes (a digest and a flag byte per item and commit), without a Flatten;
        # each bucket of items is counted where it is grouped.
        items = (
            {"flags": flags}
            | "PerItem" >> portable.GroupEncoded({"flags": (_flag_byte, _from_flag_byte)}, key_type=bytes, per_bucket=True)
            | "Items" >> CombineToOne(ItemTotalsFn(), inputs=_item_flags)
        )
        return (
            {"totals": totals, "items": items}
            | "Join" >> JoinSingletons()
            | "Merge" >> beam.Map(lambda joined: {**joined["totals"], **joined["items"]})
        )


def _flag_byte(flag: int) -> bytes:
    return bytes((flag,))


def _from_flag_byte(data: bytes) -> int:
    return data[0]


def _one(record: dict[str, Any]) -> tuple[dict[str, Any]]:
    """A commit record is one input of `CommitTotalsFn`, totalled where it is made."""
    return (record,)


def _item_flags(bucket: portable.Bucket) -> Iterator[int]:
    """Each item's flags in a bucket of `PerItem`, its commits' flags together."""
    for _, groups in bucket:
        yield _or(groups["flags"])


def _or(flags: Iterable[int]) -> int:
    out = 0
    for flag in flags:
        out |= flag
    return out


__all__ = ["SummariseRun", "ITEM_STAGES"]
