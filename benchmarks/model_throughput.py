"""Throughput of `tf_model` and `onnx_model` on small models next to `logmel` alone: audio seconds per wall second.

    python benchmarks/model_throughput.py [--minutes 4] [--repeats 3] [--no_pipeline]

Two small models, saved as `.keras` files with fixed random weights:
- `encoder`: the examples/train_keras.py architecture cut at its penultimate layer
  (log-mel [B, T, 64] -> Conv1D 32 -> average over time -> Dense 32), run with `input: logmel`
  next to `logmel`, so the log-mel is computed once for both;
- `wavecnn`: waveform [B, n] -> Conv1D 16 (25 ms window, 10 ms stride) -> Conv1D 32 -> average
  over time -> Dense 64, with `input: waveform`;
- windowed models of real shapes, each a named instance (`extractor:`): `tagger` (Keras, 0.96 s
  windows every 0.48 s at 16 kHz laid out `[N, n, 1]`: Conv1D 16 (25 ms, 10 ms stride) -> Conv1D
  32 -> average -> Dense 64) and `pitchcnn` (ONNX, ~2 s windows every second at 22.05 kHz laid
  out `[N, 1, n]`, so every item is resampled: Conv 8 x 512 stride 256 -> ReLU -> mean and max
  over time, two outputs), alone and together with `logmel`.
Prints, for each feature set, the extraction stage alone (`Batch.outputs` over batches of 240 s,
the pipeline's default batch, of 10 s clips) and the whole pipeline (listing to run.json on the
default in-process runner, 16 kHz mono WAVs; `--no_pipeline` skips it), as audio seconds per wall
second and as a throughput ratio to `logmel` alone (>1 = faster), and the stage's CPU seconds per
audio second (all threads: TensorFlow and onnxruntime use several): medians of `repeats` rounds,
the sets interleaved within each round so that a shared machine's load falls on all of them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SR = 16000
CLIP = 10.0
TAGGER_WINDOW = 15360  # 0.96 s at 16 kHz
PITCH_WINDOW = 43844  # about 2 s at 22.05 kHz


def save_models(root: Path) -> dict[str, str]:
    import keras

    keras.utils.set_random_seed(0)
    encoder = keras.Sequential(
        [
            keras.Input(shape=(None, 64)),
            keras.layers.Rescaling(1 / 40.0, offset=2.0),
            keras.layers.Conv1D(32, 5, activation="relu", padding="same"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(32, activation="relu"),
        ]
    )
    wavecnn = keras.Sequential(
        [
            keras.Input(shape=(None,)),
            keras.layers.Reshape((-1, 1)),
            keras.layers.Conv1D(16, 400, strides=160, activation="relu"),
            keras.layers.Conv1D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(64),
        ]
    )
    tagger = keras.Sequential(
        [
            keras.Input(shape=(TAGGER_WINDOW, 1)),
            keras.layers.Conv1D(16, 400, strides=160, activation="relu"),
            keras.layers.Conv1D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(64),
        ]
    )
    paths = {"encoder": str(root / "encoder.keras"), "wavecnn": str(root / "wavecnn.keras"),
             "tagger": str(root / "tagger.keras"), "pitchcnn": str(root / "pitchcnn.onnx")}
    encoder.save(paths["encoder"])
    wavecnn.save(paths["wavecnn"])
    tagger.save(paths["tagger"])
    save_pitchcnn(paths["pitchcnn"])
    return paths


def save_pitchcnn(path: str) -> None:
    """An ONNX model over `audio [N, 1, PITCH_WINDOW]`: Conv (8 filters of 512, stride 256), ReLU,
    then `mean [N, 8]` and `peak [N, 8]` over time."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = (0.05 * np.random.default_rng(2).standard_normal((8, 1, 512))).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["audio", "w"], ["conv"], strides=[256]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("ReduceMean", ["act"], ["mean"], axes=[2], keepdims=0),
        helper.make_node("ReduceMax", ["act"], ["peak"], axes=[2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "pitchcnn", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", 1, PITCH_WINDOW])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("peak", TensorProto.FLOAT, ["N", 8])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def feature_sets(models: dict[str, str]) -> dict[str, dict[str, dict]]:
    tagger = {"extractor": "tf_model", "path": models["tagger"], "window_seconds": 0.96, "hop_seconds": 0.48,
              "input_shape": [-1, 1]}
    pitch = {"extractor": "onnx_model", "path": models["pitchcnn"], "sample_rate": 22050, "window_samples": PITCH_WINDOW,
             "hop_samples": 22050, "input_shape": [1, -1]}
    return {
        "logmel": {"logmel": {}},
        "logmel + tf_model(encoder, input=logmel)": {"logmel": {}, "tf_model": {"path": models["encoder"], "input": "logmel"}},
        "tf_model(encoder, input=logmel) alone": {"tf_model": {"path": models["encoder"], "input": "logmel"}},
        "tf_model(wavecnn, input=waveform)": {"tf_model": {"path": models["wavecnn"]}},
        "tags: tf_model 0.96 s windows @16k": {"tags": tagger},
        "pitch: onnx_model 2 s windows @22.05k": {"pitch": pitch},
        "logmel + tags + pitch": {"logmel": {}, "tags": tagger, "pitch": pitch},
    }


def stage_seconds(sets: dict[str, dict[str, dict]], *, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of `Batch.outputs` for each set, rounds interleaved so load hits all alike."""
    import numpy as np

    from features import Batch, registry

    built = {}
    for label, features in sets.items():
        built[label] = [registry.build_instance(name, values, sample_rate=SR) for name, values in features.items()]
        for e in built[label]:
            e.setup()
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(int(CLIP * SR))).astype(np.float32) for _ in range(24)]  # 240 s
    times: dict[str, list[float]] = {label: [] for label in sets}
    cpu: dict[str, list[float]] = {label: [] for label in sets}
    for round_ in range(repeats + 1):  # round 0 warms up TensorFlow
        for label, extractors in built.items():
            batch = Batch.from_waveforms(clips, sample_rate=SR)
            start, start_cpu = time.perf_counter(), time.process_time()
            for e in extractors:
                batch.outputs(e)
            if round_:
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
    return times, cpu


def pipeline_seconds(sets: dict[str, dict[str, dict]], corpus: Path, out: Path, *, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of whole pipeline runs for each set, rounds interleaved."""
    import yaml

    from pipelines import extract

    out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for i, (label, features) in enumerate(sets.items()):
        configs[label] = out / f"set{i}.yaml"
        configs[label].write_text(yaml.safe_dump({"features": features}))
    times: dict[str, list[float]] = {label: [] for label in sets}
    for round_ in range(repeats):
        for i, label in enumerate(sets):
            start = time.monotonic()
            extract.run([f"--dataset={corpus}", f"--config={configs[label]}", f"--output={out}", f"--run_id=set{i}-{round_}"])
            times[label].append(time.monotonic() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_pipeline", action="store_true", help="time the extraction stage only")
    args = parser.parse_args()

    import numpy as np
    import soundfile

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = save_models(tmp)
        corpus = tmp / "corpus" / "x"
        corpus.mkdir(parents=True)
        rng = np.random.default_rng(1)
        n = int(np.ceil(args.minutes * 60 / CLIP))
        for i in range(n):
            soundfile.write(corpus / f"clip_{i:03d}.wav", (0.1 * rng.standard_normal(int(CLIP * SR))).astype(np.float32), SR)
        seconds = n * CLIP
        print(f"stage: batches of 24 x {CLIP:.0f} s; pipeline: {n} clips, {seconds:.0f} s audio; "
              f"median of {args.repeats} interleaved rounds; load average before: {os.getloadavg()[0]:.1f}")
        sets = feature_sets(models)
        stage, cpu = stage_seconds(sets, repeats=args.repeats)
        if args.no_pipeline:
            whole = {label: [float("nan")] for label in sets}
        else:
            whole = pipeline_seconds(sets, tmp / "corpus", tmp / "runs", repeats=args.repeats)
        base_stage, base_whole = statistics.median(stage["logmel"]), statistics.median(whole["logmel"])
        print(f"{'features':42s} {'stage audio s/s':>16s} {'x logmel':>9s} {'stage cpu s/audio s':>20s} "
              f"{'pipeline audio s/s':>19s} {'x logmel':>9s}")
        for label in sets:
            st, wh, c = statistics.median(stage[label]), statistics.median(whole[label]), statistics.median(cpu[label])
            print(f"{label:42s} {24 * CLIP / st:16.0f} {base_stage / st:9.2f} {c / (24 * CLIP):20.4f} "
                  f"{seconds / wh:19.1f} {base_whole / wh:9.2f}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
