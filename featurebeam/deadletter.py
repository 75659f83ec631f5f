"""Dead-letter records: what the pipeline emits instead of crashing on one bad item."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from featurebeam.redact import scrub

def printable(text: str) -> str:
    """`text` unchanged when it is valid UTF-8 text, else with undecodable bytes as \\xNN escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


DEAD = "dead"  # the tagged output every per-item DoFn sends its DeadLetters to

STAGES = ("list", "read", "decode", "condition", "extract", "export")


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One item that could not be processed.

    stage: where it failed, one of STAGES. reason: a short stable code (`AudioError.reason`, or
    the exception class name for unexpected errors). error_type: the exception class name. message: the
    exception's message, which names the item and the reason. extractors: "name@version" of the
    run's extractors, so a failure can be matched to the code that produced it.
    """

    key: str
    uri: str
    stage: str
    error_type: str
    message: str
    extractors: tuple[str, ...] = ()
    reason: str = ""
    item_key: str = ""  # the listed item's key (differs from `key` for a segment)

    def __post_init__(self):
        # A non-UTF-8 local file name arrives with lone surrogates, which no JSON, Parquet or
        # BigQuery writer accepts; records show such bytes as \xNN escapes instead.
        for name in ("key", "uri", "message", "item_key"):
            object.__setattr__(self, name, printable(getattr(self, name)))
        # Dead letters are written to errors/, the SQL tables and BigQuery, and quoted in logs and
        # run.json: an exception that quotes a token, a signed URL or a key file must not carry it
        # there. Keys stay as they are: they are joined on (resume, reuse), and derive from URIs.
        for name in ("uri", "message"):
            object.__setattr__(self, name, scrub(getattr(self, name)))

    @classmethod
    def from_exception(
        cls, *, key: str, uri: str, stage: str, exc: BaseException, extractors=(), item_key: str = ""
    ) -> "DeadLetter":
        return cls(
            item_key=item_key or key,
            key=key,
            uri=uri,
            stage=getattr(exc, "stage", stage),
            error_type=type(exc).__name__,
            message=str(exc)[:4000],
            extractors=tuple(extractors),
            reason=getattr(exc, "reason", None) or type(exc).__name__,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "DeadLetter":
        data: dict[str, Any] = json.loads(line)
        data["extractors"] = tuple(data.get("extractors", ()))
        data.setdefault("item_key", data["key"])
        return cls(**data)
