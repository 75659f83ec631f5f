"""A decoder child taken over by a crafted file, for the tests of featurebeam/isolation.py.

    python tests/featurebeam/hostile_decoder.py MARKER

It speaks the protocol like the real child for every item, except one whose URI contains
"evil-<mode>": for that one it sends what MODES[mode] makes, then serves on, waits, exits or
kills itself. MARKER is a path that a pickle it sends would create if the worker ever loaded it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import sys
import time

from featurebeam import isolation
from featurebeam.decoding import stream_conditioned


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code an exploit would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def runs_code_pickle(marker: str) -> bytes:
    return pickle.dumps(("item", RunsCode(marker)), protocol=5)


def message(kind: bytes, header: bytes = b"", payload: bytes = b"", *, magic: bytes = isolation._MAGIC,
            header_size: int | None = None, payload_size: int | None = None) -> bytes:
    """One message as bytes; the sizes in its prefix may lie."""
    size = len(header) if header_size is None else header_size
    return isolation._PREFIX.pack(magic, kind, size, len(payload) if payload_size is None else payload_size) + header + payload


def json_message(obj) -> bytes:
    return message(b"J", obj if isinstance(obj, bytes) else json.dumps(obj).encode())


def source(item: int, *, rate: int = 44100, channels: int = 2, frames: int = 88200, codec: bytes = b"x") -> bytes:
    return message(b"S", isolation._SOURCE.pack(item, rate, channels, frames), codec)


def segment(item: int, frames: int, *, start: int = 0, flags: int = isolation._LAST, payload: bytes | None = None) -> bytes:
    return message(b"G", isolation._SEGMENT.pack(item, start, flags), b"\0" * (4 * frames) if payload is None else payload)


def end(item: int, *, payload: bytes = b"") -> bytes:
    return message(b"E", isolation._END.pack(item), payload)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def error(item: int, **fields) -> bytes:
    return json_message({"kind": "audio_error", "item": item, "stage": "decode", "reason": "empty", "message": "x", **fields})


MORE = 0  # segment flags: not the last


# MODE -> (what is sent for the evil item, then: "serve" the next requests, "wait" forever, "exit" or "kill")
MODES = {
    # The worker of old: a pickle frame (length, buffer count, pickle) it would have loaded.
    "pickle_frame": lambda item, marker: (struct.pack("<QI", len(runs_code_pickle(marker)), 0) + runs_code_pickle(marker), "wait"),
    "pickle_as_header": lambda item, marker: (json_message(runs_code_pickle(marker)), "wait"),
    # Well-formed messages whose samples are the pickle's bytes: they arrive as float32 data.
    "pickle_as_samples": lambda item, marker: (
        source(item) + segment(item, 0, payload=padded(runs_code_pickle(marker))) + end(item), "serve"),
    "error_with_pickle": lambda item, marker: (json_message({"kind": "error", "item": item, "type": "builtins.ValueError",
        "message": "x", "traceback": "", "pickled": runs_code_pickle(marker).hex()}), "wait"),
    "garbage": lambda item, marker: (os.urandom(4096), "wait"),
    "truncated_prefix": lambda item, marker: (end(item)[:7], "exit"),
    "truncated_header": lambda item, marker: (end(item)[:-3], "exit"),
    "truncated_samples": lambda item, marker: (source(item) + segment(item, 8000)[:-1000], "exit"),
    "truncated_then_killed": lambda item, marker: (source(item) + segment(item, 8000)[:-1000], "kill"),
    "oversized_header": lambda item, marker: (message(b"J", b"{", header_size=1 << 30), "wait"),
    "oversized_segment": lambda item, marker: (source(item) + message(b"G", isolation._SEGMENT.pack(item, 0, 1),
                                                                      payload_size=4 << 40), "wait"),
    "segment_one_too_long": lambda item, marker: (source(item) + segment(item, 8001), "wait"),
    "oversized_codec": lambda item, marker: (source(item, codec=b"c" * 100_000), "wait"),
    "codec_not_utf8": lambda item, marker: (source(item, codec=b"\xff\xfe"), "wait"),
    "half_a_sample": lambda item, marker: (source(item) + segment(item, 0, payload=b"\0" * 42), "wait"),
    "payload_after_end": lambda item, marker: (source(item) + segment(item, 10) + end(item, payload=b"\0" * 8), "wait"),
    "long_struct_header": lambda item, marker: (message(b"E", isolation._END.pack(item) + b"\0" * 8), "wait"),
    "unknown_kind": lambda item, marker: (message(b"X", isolation._END.pack(item)), "wait"),
    "rate_out_of_range": lambda item, marker: (source(item, rate=10**9), "wait"),
    "no_channels": lambda item, marker: (source(item, channels=0), "wait"),
    "frames_below_unknown": lambda item, marker: (source(item, frames=-5), "wait"),
    "unknown_flags": lambda item, marker: (source(item) + segment(item, 10, flags=4), "wait"),
    "deep_json": lambda item, marker: (json_message(b"[" * 200_000), "wait"),
    "huge_number": lambda item, marker: (json_message(b'{"kind": "ready", "n": 1' + b"0" * 5000 + b"}"), "wait"),
    "not_an_object": lambda item, marker: (json_message([1, 2, 3]), "wait"),
    "source_as_json": lambda item, marker: (json_message({"kind": "source", "item": item, "sample_rate": 44100}), "wait"),
    "extra_field": lambda item, marker: (error(item, also=1), "wait"),
    "string_item": lambda item, marker: (error(str(item)), "wait"),
    "bad_reason": lambda item, marker: (error(item, reason="<script>"), "wait"),
    "bad_stage": lambda item, marker: (error(item, stage="launcher"), "wait"),
    "long_message": lambda item, marker: (error(item, message="x" * 100_000), "wait"),
    "bad_type_name": lambda item, marker: (json_message({"kind": "error", "item": item, "type": "os.system('x')",
                                                         "message": "x", "traceback": ""}), "wait"),
    "other_item": lambda item, marker: (end(item + 1000), "wait"),
    "segment_before_source": lambda item, marker: (segment(item, 10), "wait"),
    "second_source": lambda item, marker: (source(item) + source(item), "wait"),
    "gap_between_segments": lambda item, marker: (source(item) + segment(item, 10, flags=MORE) + segment(item, 10, start=11),
                                                  "wait"),
    "segment_after_last": lambda item, marker: (source(item) + segment(item, 10) + segment(item, 10, start=10), "wait"),
    "end_before_last": lambda item, marker: (source(item) + segment(item, 10, flags=MORE) + end(item), "wait"),
    "ready_again": lambda item, marker: (json_message({"kind": "ready"}), "wait"),
}


def main(marker: str) -> int:
    requests = io.FileIO(os.dup(0), "rb")
    replies = os.dup(1)
    os.dup2(2, 1)
    isolation._write_all(replies, [json_message({"kind": "ready"})])
    while True:
        (request,), _, _ = isolation._read_message(requests, None, None, isolation._request)
        if request["kind"] == "close":
            return 0
        item, uri = request["item"], request["uri"]
        if "evil-" not in uri:
            for part in stream_conditioned(uri, **request["kwargs"]):
                isolation._write_all(replies, isolation._reply_part(item, part))
            isolation._write_all(replies, [end(item)])
            continue
        data, then = MODES[uri.split("evil-")[-1].split(".")[0]](item, marker)
        isolation._write_all(replies, [data])
        if then == "serve":
            continue
        if then == "exit":
            os._exit(0)
        if then == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
