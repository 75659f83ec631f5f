"""The built-in `sample` dataset: small, labelled, deterministic audio generated on first use.

Five classes whose spectra differ plainly (tone, chord, chirp, noise, clicks), 12 clips each of
2 s, written as WAV, FLAC, OGG/Vorbis and MP3 at mixed sample rates and channel counts, so the
sample run exercises decoding, mixdown and resampling with no network. Every fourth clip of a
class is in the `test` split. The same seed gives the same samples; the encoded bytes depend
only on the bundled libsndfile's encoders.

Workers that cannot read this machine's cache (Dataflow, a portable runner, a Dask cluster
without a shared disk) get a copy: `SampleDataset.staged(to=OUTPUT)` uploads the clips and then
the manifest to `<OUTPUT>/_sample/v<VERSION>-<content hash>/` once (a copy whose manifest is
there is complete, so a later launch uploads nothing) and lists it from there, with the same keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
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
STAGED = "_sample"  # the folder under --output that holds staged copies
MANIFEST = "manifest.jsonl"
_UPLOAD_THREADS = 8


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


def _files(root: Path) -> list[str]:
    """The clips the manifest under `root` names, relative to `root`, in manifest order."""
    return [json.loads(line)["uri"] for line in (root / MANIFEST).read_text().splitlines() if line.strip()]


def content_hash(root: Path) -> str:
    """sha256 (16 hex digits) over the manifest and every clip it names, names and bytes: the
    staged copy's folder name, so another encoder build's bytes go to another folder."""
    digest = hashlib.sha256()
    for name in (MANIFEST, *_files(root)):
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def stage(*, root: Path, to: str) -> str:
    """Copy the sample generated under `root` to `<to>/_sample/v<VERSION>-<content hash>` on any
    Beam file system, unless the manifest is there already; returns that folder.

    The clips go first (in parallel) and the manifest last, so a copy with a manifest is complete
    and one interrupted midway is finished by the next launch.
    """
    from apache_beam.io.filesystems import FileSystems

    generate(root)
    target = FileSystems.join(to.rstrip("/"), STAGED, f"v{VERSION}-{content_hash(root)}")
    if FileSystems.exists(FileSystems.join(target, MANIFEST)):
        return target

    def upload(name: str) -> None:
        with FileSystems.create(FileSystems.join(target, *name.split("/")), mime_type="application/octet-stream") as out:
            out.write((root / name).read_bytes())

    with ThreadPoolExecutor(_UPLOAD_THREADS) as pool:
        list(pool.map(upload, _files(root)))
    upload(MANIFEST)
    return target


class SampleDataset(ManifestDataset):
    """The generated sample set, listed through its manifest.

    root: where the clips and manifest are: a local folder (generated there on `prepare`; default
    the cache), or a staged copy's folder on any Beam file system (see `staged`).
    """

    def __init__(self, *, root: str | None = None, name: str = "sample"):
        self.root = str(root) if root else str(cache_dir() / f"sample-v{VERSION}")
        super().__init__(uri=posixpath.join(self.root, MANIFEST), name=name, format="jsonl")

    @property
    def local(self) -> bool:
        return "://" not in self.root

    def prepare(self) -> None:
        if self.local:
            generate(Path(self.root))
        super().prepare()

    def staged(self, *, to: str) -> "SampleDataset":
        """This sample (generated here if need be) copied under `to` once, as a dataset of the same name."""
        if not self.local:
            return self
        return SampleDataset(root=stage(root=Path(self.root), to=to), name=self.name)

    def describe(self):
        return {**super().describe(), "version": VERSION, "root": self.root}

    def identity(self):
        return {k: v for k, v in super().identity().items() if k != "root"}
