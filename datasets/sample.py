"""The built-in `sample` dataset: small, labelled, deterministic audio generated on first use.

Five classes whose spectra differ plainly (tone, chord, chirp, noise, clicks), 12 clips each of
2 s, written as WAV, FLAC, OGG/Vorbis and MP3 at mixed sample rates and channel counts, so the
sample run exercises decoding, mixdown and resampling with no network. Every fourth clip of a
class is in the `test` split. The same seed gives the same samples; the encoded bytes depend
only on the bundled libsndfile's encoders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from datasets.manifest import ManifestDataset

VERSION = "1"
CLASSES = ("tone", "chord", "chirp", "noise", "clicks")
CLIPS_PER_CLASS = 12
SECONDS = 2.0
FORMATS = (  # (extension, soundfile format, subtype)
    (".wav", "WAV", "PCM_16"),
    (".flac", "FLAC", "PCM_16"),
    (".ogg", "OGG", "VORBIS"),
    (".mp3", "MP3", "MPEG_LAYER_III"),
)
RATES = (16000, 22050, 44100)


def cache_dir() -> Path:
    """Where generated data lives: $FEATUREBEAM_CACHE_DIR, else ~/.cache/featurebeam."""
    return Path(os.environ.get("FEATUREBEAM_CACHE_DIR") or Path.home() / ".cache" / "featurebeam")


def _signal(label: str, index: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(SECONDS * rate)) / rate
    if label == "tone":
        freq = 220.0 * 2 ** (index / 6)  # 220 Hz to ~830 Hz in half-octave steps
        y = np.sin(2 * np.pi * freq * t)
    elif label == "chord":
        root = 196.0 * 2 ** (index / 12)
        y = sum(np.sin(2 * np.pi * root * ratio * t) for ratio in (1.0, 1.26, 1.5)) / 3
    elif label == "chirp":
        f0, f1 = 200.0 + 50 * index, 3000.0 + 200 * index
        y = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * SECONDS)))
    elif label == "noise":
        y = rng.standard_normal(len(t)) * 0.3
    elif label == "clicks":
        y = np.zeros(len(t))
        period = int(rate * 60.0 / (90 + 10 * index))
        y[::period] = 1.0
        y += rng.standard_normal(len(t)) * 0.01
    else:
        raise ValueError(label)
    return (0.5 * y / max(1e-9, np.abs(y).max())).astype(np.float32)


def generate(root: Path) -> Path:
    """Write the clips and `manifest.jsonl` under `root` (idempotent); returns the manifest path."""
    import soundfile

    manifest = root / "manifest.jsonl"
    if manifest.exists():
        return manifest
    rows = []
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(CLIPS_PER_CLASS):
            rng = np.random.default_rng(1000 * c + i)
            ext, fmt, subtype = FORMATS[(c + i) % len(FORMATS)]
            rate = RATES[(c + 2 * i) % len(RATES)]
            y = _signal(label, i, rate, rng)
            if i % 3 == 2:  # some stereo files, with a quieter right channel
                y = np.stack([y, 0.5 * y], axis=1)
            name = f"{label}_{i:02d}{ext}"
            soundfile.write(root / label / name, y, rate, format=fmt, subtype=subtype)
            rows.append(
                {
                    "key": f"sample/{label}/{name}",
                    "uri": f"{label}/{name}",
                    "label": label,
                    "split": "test" if i % 4 == 3 else "train",
                }
            )
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, manifest)  # the manifest appears last, only once every clip is written
    return manifest


class SampleDataset(ManifestDataset):
    """The generated sample set, listed through its manifest."""

    def __init__(self, *, root: str | None = None, name: str = "sample"):
        self.root = Path(root) if root else cache_dir() / f"sample-v{VERSION}"
        super().__init__(uri=str(self.root / "manifest.jsonl"), name=name, format="jsonl")

    def prepare(self) -> None:
        generate(self.root)
        super().prepare()

    def describe(self):
        return {**super().describe(), "version": VERSION, "root": str(self.root)}

    def identity(self):
        return {k: v for k, v in super().identity().items() if k != "root"}
