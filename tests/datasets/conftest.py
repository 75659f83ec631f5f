"""Fixtures for the cloud adapter tests: real encoded audio in the emulated bucket.

`gcs_audio` uploads, once per session, short WAV, FLAC and OGG/Vorbis clips in the
`<bucket>/corpus/<label>/<clip>` layout, plus objects that are not audio, to the GCS emulator
started by `tests/emulators.py`. The same objects back the GCS, BigQuery and manifest tests;
the emulator fixtures are registered once, in tests/conftest.py.
"""

from __future__ import annotations

import dataclasses
import io

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
