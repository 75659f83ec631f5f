"""Fixtures for the cloud adapter tests: real encoded audio in the emulated bucket.

`gcs_audio` uploads, once per session, short WAV, FLAC and OGG/Vorbis clips in the
`<bucket>/corpus/<label>/<clip>` layout, plus objects that are not audio, to the GCS emulator
started by `tests/emulators.py`. The same objects back the GCS, BigQuery and manifest tests;
the emulator fixtures are registered once, in tests/conftest.py.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest

AUDIO_BUCKET = "featurebeam-audio"
RATE = 16000
FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
# label -> tone frequency; every label gets one clip per format.
LABELS = {"crow": 440.0, "wren": 1760.0}


@dataclasses.dataclass(frozen=True)
class GcsAudio:
    """What `gcs_audio` uploaded: URIs of the audio clips (-> label) and of the other objects."""

    bucket: str
    clips: dict[str, str]  # gs:// URI -> label
    sizes: dict[str, int]  # gs:// URI -> bytes
    others: tuple[str, ...]

    @property
    def root(self) -> str:
        return f"gs://{self.bucket}/corpus"


def counts(run: dict) -> dict[str, int]:
    """The run's item and record counts (run.json may carry further counts)."""
    return {k: run["counts"][k] for k in ("listed", "ok", "failed", "records")}


def encode(frequency: float, *, ext: str, seconds: float = 0.5, seed: int = 0) -> bytes:
    """A tone plus a little noise (fixed seed), encoded as `ext`."""
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    y = (0.4 * np.sin(2 * np.pi * frequency * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    buffer = io.BytesIO()
    fmt, subtype = FORMATS[ext]
    soundfile.write(buffer, y, RATE, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def gcs_audio(gcs_emulator) -> GcsAudio:
    bucket = gcs_emulator.make_bucket(AUDIO_BUCKET)
    clips, sizes = {}, {}
    for i, (label, frequency) in enumerate(LABELS.items()):
        for j, ext in enumerate(FORMATS):
            name = f"corpus/{label}/{label}_{j}{ext}"
            data = encode(frequency, ext=ext, seed=10 * i + j)
            bucket.blob(name).upload_from_string(data)
            clips[f"gs://{AUDIO_BUCKET}/{name}"] = label
            sizes[f"gs://{AUDIO_BUCKET}/{name}"] = len(data)
    others = ("corpus/README.txt", "corpus/crow/notes.json", "docs/only-text.txt")
    for name in others:
        bucket.blob(name).upload_from_string(b"not audio")
    return GcsAudio(bucket=AUDIO_BUCKET, clips=clips, sizes=sizes, others=tuple(f"gs://{AUDIO_BUCKET}/{n}" for n in others))


def run_listing(dataset, transform=None) -> tuple[list, dict[str, int]]:
    """(every element `dataset.listing()` (or `transform`) emits, the run's counters by name),
    on the FnApiRunner."""
    import pickle
    import tempfile
    from pathlib import Path

    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter

    from tests.beam_util import _Dump

    with tempfile.TemporaryDirectory() as folder:
        pipeline = beam.Pipeline(runner="FnApiRunner")
        _ = pipeline | (transform or dataset.listing()) | beam.ParDo(_Dump(folder))
        result = pipeline.run()
        result.wait_until_finish()
        elements = [e for path in sorted(Path(folder).glob("*.pkl")) for e in pickle.loads(path.read_bytes())]
    counters: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:  # one per step: sum them
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + counter.committed
    return elements, counters


class FaultProxy:
    """An HTTP proxy in front of the GCS emulator that fails chosen object listings.

    The emulator has no fault injection, so this sits on the wire between the real client and
    the real emulator, as a network fault would: it forwards every request unchanged, counts the
    object listings per (prefix, delimiter), and answers `status` instead of forwarding to the
    next `times` listings of one prefix.
    """

    def __init__(self, upstream: str):
        import collections
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        self.upstream = urlsplit(upstream)
        self.lists: collections.Counter = collections.Counter()
        self.requests = 0  # every request that reached the proxy
        self.paths: list = []
        self.failing: dict[str, list[int]] = {}  # prefix -> [times left, status]
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                import http.client

                url = urlsplit(self.path)
                with proxy.lock:
                    proxy.requests += 1
                    proxy.paths.append((self.command, self.path))
                if self.command == "GET" and url.path.startswith("/storage/v1/b/") and url.path.endswith("/o"):
                    query = parse_qs(url.query)
                    prefix = query.get("prefix", [""])[0]
                    with proxy.lock:
                        proxy.lists[(prefix, query.get("delimiter", [None])[0])] += 1
                        fault = proxy.failing.get(prefix)
                        if fault and fault[0] > 0:
                            fault[0] -= 1
                            body = json.dumps({"error": {"code": fault[1], "message": "injected by FaultProxy"}}).encode()
                            self.send_response(fault[1])
                            self.send_header("Content-Type", "application/json")
                            self.send_header("Content-Length", str(len(body)))
                            self.end_headers()
                            self.wfile.write(body)
                            return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, prefix: str, *, times: int, status: int = 503) -> None:
        with self.lock:
            self.failing[prefix] = [times, status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_gcs(gcs_emulator, monkeypatch):
    """A FaultProxy in front of the emulator, with STORAGE_EMULATOR_HOST pointing at it."""
    proxy = FaultProxy(gcs_emulator.endpoint)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
    yield proxy
    proxy.close()
