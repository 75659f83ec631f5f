"""Codecs for the TFRecord and Parquet exports, by measurement: CPU per MB of features and size.

    python benchmarks/compression.py [--copies 8] [--repeats 5] [--features logmel,mfcc]

Rows are real features: 2 s clips at 16 kHz through the log-mel (64 bands) and MFCC (20)
extractors, the same rows repeated `--copies` times under new keys. `--source=noisy` (default):
recording-like clips (moving tones, bursts, a noise floor); `--source=sample`: the built-in
sample set's clean synthetic clips, whose log-mels sit at the -80 dB floor in most bins and so
compress far better than real audio's. Each codec then
does what a worker's commit does (export/commit.py, export/formats.py) for shards of 64 rows:
rows -> TFRecord bytes (SequenceExample encoding, framing, compression) or an Arrow table ->
Parquet bytes, and the shard written to local disk. The SequenceExample / Arrow conversion is
timed with every codec (it is the same work for each); the `codec only` column leaves it out.

Prints, per codec: process CPU seconds per MB of float32 feature values (median of `--repeats`),
the share of it spent compressing, output bytes per feature byte, and MB of features per CPU
second. The last column is what a run's `encode` + `write` stages cost for that codec.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD_ROWS = 64  # --commit_records' default
TFRECORD_CODECS = ("none", "gzip:1", "gzip:6", "gzip:9")
PARQUET_CODECS = ("none", "snappy", "lz4", "zstd:1", "zstd:3", "zstd:9", "gzip:1", "gzip:6")


def _sample_waves():
    """(key, label, split, 16 kHz waveform) of every clip of the built-in sample set."""
    from datasets.sample import SampleDataset
    from featurebeam import audio

    dataset = SampleDataset()
    dataset.prepare()
    for line in Path(dataset.uri).read_text().splitlines():
        entry = json.loads(line)
        uri = str(Path(dataset.uri).parent / entry["uri"])  # manifest URIs are relative to it
        yield entry["key"], entry.get("label"), entry.get("split"), audio.condition(
            audio.decode(audio.read_bytes(uri), uri=uri), sample_rate=16000, uri=uri
        )


def _noisy_waves(count: int = 60):
    """Recording-like clips: moving tones, bursts and a noise floor (benchmarks/compare.py's
    signal), 2 s at 16 kHz. Unlike the sample set's clean synthetic clips, no log-mel bin sits at
    the -80 dB floor, which makes the sample set's features more compressible than real audio's."""
    import numpy as np

    from compare import _signal  # this script's folder is on sys.path

    for i in range(count):
        yield f"noisy/{i:03d}", f"class{i % 5}", "train", _signal(np.random.default_rng(i), 2.0, 16000, 1)


def feature_rows(features: list[str], copies: int, source: str):
    """FeatureRows of real extractor outputs on `source` clips, `copies` times over under new keys."""
    import numpy as np

    from featurebeam.elements import FeatureRow
    from features import Batch, registry

    extractors = [registry.build(name, {}, sample_rate=16000) for name in features]
    for e in extractors:
        e.setup()
    specs = tuple(spec for e in extractors for spec in e.output_specs())
    base = []
    for key, label, split, wave in (_sample_waves() if source == "sample" else _noisy_waves()):
        uri = f"/{key}.wav"
        batch = Batch.from_waveforms([wave], sample_rate=16000)
        values = {}
        for e in extractors:
            for spec in e.output_specs():
                out = batch.outputs(e)[spec.name][0]
                values[spec.name] = np.asarray(out[: 1 + len(wave) // spec.hop_length] if spec.level == "frame" else out, dtype=np.float32)
        base.append(FeatureRow(
            key=key, item_key=key, uri=uri, label=label, split=split, metadata=(),
            start_sample=0, segment_index=0, last_segment=True, silent=False, sample_rate=16000, source_sample_rate=16000,
            source_channels=1, source_duration_seconds=len(wave) / 16000, num_samples=len(wave), features=values,
        ))
    rows = [dataclasses.replace(row, key=f"{row.key}~{c}", item_key=f"{row.item_key}~{c}") for c in range(copies) for row in base]
    return rows, specs


def _cpu() -> float:
    return time.process_time()


def measure(rows, specs, *, kind: str, codec: str, folder: Path) -> tuple[float, float, int]:
    """(CPU s for the whole export, CPU s in the codec alone, output bytes) of one pass over `rows`."""
    import pyarrow as pa

    from export import formats
    from export.records import arrow_schema, to_parquet_row, to_tf_record

    chosen = formats.parse(**({"tfrecord_compression": codec} if kind == "tfrecord" else {"parquet_compression": codec}))
    schema = arrow_schema(specs)
    total = codec_cpu = 0.0
    size = 0
    for i in range(0, len(rows), SHARD_ROWS):
        shard = rows[i : i + SHARD_ROWS]
        start = _cpu()
        if kind == "tfrecord":
            records = [to_tf_record(row, specs) for row in shard]
            mid = _cpu()
            data = chosen.tfrecord_bytes(records)
        else:
            table = pa.Table.from_pylist([to_parquet_row(row, specs) for row in shard], schema=schema)
            mid = _cpu()
            data = chosen.parquet_bytes(table)
        path = folder / f"part-{i:06d}"
        path.write_bytes(data)
        end = _cpu()
        total += end - start
        codec_cpu += end - mid
        size += len(data)
        path.unlink()
    return total, codec_cpu, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="logmel,mfcc")
    parser.add_argument("--copies", type=int, default=8, help="times the sample set's rows are repeated (more data, steadier times)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", choices=("sample", "noisy"), default="noisy",
                        help="noisy: recording-like clips (default); sample: the sample set's clean synthetic clips")
    args = parser.parse_args()

    rows, specs = feature_rows([f.strip() for f in args.features.split(",")], args.copies, args.source)
    feature_bytes = sum(4 * row.features[s.name].size for row in rows for s in specs)
    mb = feature_bytes / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{len(rows)} rows of {args.source} clips ({args.features}; {', '.join(f'{s.name} {list(rows[0].features[s.name].shape)}' for s in specs)}), "
          f"{mb:.1f} MB of float32 feature values, shards of {SHARD_ROWS} rows, median of {args.repeats}\n")
    print("| export | codec | CPU s per MB | codec only (s/MB) | bytes per feature byte | MB per CPU s |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work:
        for kind in ("tfrecord", "parquet"):  # warm-up: imports, first allocations
            measure(rows[:SHARD_ROWS], specs, kind=kind, codec="none", folder=Path(work))
        for kind, codecs in (("tfrecord", TFRECORD_CODECS), ("parquet", PARQUET_CODECS)):
            for codec in codecs:
                passes = [measure(rows, specs, kind=kind, codec=codec, folder=Path(work)) for _ in range(args.repeats)]
                cpu = statistics.median(p[0] for p in passes)
                codec_cpu = statistics.median(p[1] for p in passes)
                size = passes[0][2]
                print(f"| {kind} | {codec} | {cpu / mb:.4f} | {codec_cpu / mb:.4f} | {size / feature_bytes:.3f} | {mb / cpu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
