"""Training-side loader: a run folder in, a `tf.data.Dataset` of `(features, label)` out.

Parse specs come from the run's own `schema.pbtxt`, and label ids from the sorted label
vocabulary in `features.json`, so no training script writes a parse spec by hand.
"""

from __future__ import annotations

from typing import Sequence

from export import formats, metadata
from export.schema import from_pbtxt, parse_specs
from featurebeam.errors import OutputError


def _run_files(run_dir: str) -> tuple[dict, list[str], str]:
    """(features.json, the TFRecord shards, their `compression_type` for tf.data) of a finished run."""
    from apache_beam.io.filesystems import FileSystems

    from export import commit

    if not FileSystems.exists(metadata.join(run_dir, metadata.RUN_JSON)):
        raise OutputError(
            f"{run_dir} has no run.json: it is not a finished featurebeam run (pass <output>/<dataset>/<run_id>)"
        )
    run = metadata.read_json(metadata.join(run_dir, metadata.RUN_JSON))
    written = formats.require(run, formats.TFRECORD, run_dir=run_dir, what="the TFRecord loader")
    # The folder's own pattern (not run.json's), so a run folder copied elsewhere loads too.
    files = metadata.matching(commit.pattern(run_dir, "tfrecords", written))
    return metadata.read_json(metadata.join(run_dir, metadata.FEATURES_JSON)), files, written.tf_compression_type


def load_tfrecords(
    run_dir: str,
    *,
    features: Sequence[str] | None = None,
    batch_size: int | None = 32,
    shuffle: int | None = None,
    split: str | None = None,
    spec_augment: dict | None = None,
    seed: int | None = None,
):
    """A `tf.data.Dataset` of `(features_dict, label)` from a run's TFRecords.

    run_dir: `<output>/<dataset>/<run_id>` (local path; TensorFlow file systems for others).
    features: output names to keep (default: all feature outputs). Frame-level features come as
      `[frames, *shape]` float32 (`[batch, max_frames, *shape]` after padded batching, with
      `<name>_frames` giving each item's true frame count); clip-level as `shape`. Each output
      keeps its type: int64 for integer and bool outputs, float32 for float ones (TFRecords hold
      no doubles), tf.string for strings; a variable-length output (shape `(-1, ...)`) is as long
      as the item's list (zero-padded by batching); events are a dict of one list per field.
    batch_size: items per batch (None = unbatched); frame-level features are zero-padded.
    shuffle: shuffle buffer size in records (None = file order).
    split: keep only records of this split (`train`, `test`, ...).
    spec_augment: for frame-level features, SpecAugment masking:
      `{"feature": "logmel", "freq_mask": 8, "time_mask": 20}` (largest mask widths in bins /
      frames); masked cells take the item's mean value (for a log-mel, its mean level in dB).
    label: int32 index into the run's sorted label vocabulary, -1 for unlabelled records.

    Returns a dataset whose element_spec carries the run's shapes.
    """
    import tensorflow as tf

    features_json, files, compression_type = _run_files(run_dir)
    if not files:
        raise OutputError(f"{run_dir}/tfrecords holds no records (the run exported nothing)")
    schema = from_pbtxt(metadata.read_text(metadata.join(run_dir, metadata.SCHEMA_PBTXT)))
    context_spec, sequence_spec = parse_specs(schema)
    outputs = {o["name"]: o for o in features_json["outputs"]}
    wanted = list(features) if features is not None else list(outputs)
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise OutputError(f"feature {unknown[0]!r} is not in run {run_dir}; it has {', '.join(outputs)}")
    vocabulary = features_json["labels"]
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(vocabulary or [""], tf.string), tf.range(len(vocabulary) or 1, dtype=tf.int32)),
        default_value=-1,
    )
    frame_scalars = {name for name, o in outputs.items() if o["level"] == "frame" and not o["shape"]}

    def parse(record):
        if sequence_spec:
            context, sequence = tf.io.parse_single_sequence_example(
                record, context_features=context_spec, sequence_features=sequence_spec
            )
        else:
            context, sequence = tf.io.parse_single_example(record, context_spec), {}
        out = {}
        for name in wanted:
            if name in sequence:
                value = sequence[name]
                if name in frame_scalars:
                    value = tf.squeeze(value, axis=-1)
                out[name] = value
                out[f"{name}_frames"] = tf.shape(value)[0]
            elif outputs[name].get("dtype") == "events":  # {field: [events]}, one list per field
                out[name] = {field: context[f"{name}/{field}"] for field, _ in outputs[name]["fields"]}
            elif outputs[name]["shape"][:1] == [-1] and len(outputs[name]["shape"]) > 1:
                out[name] = tf.reshape(context[name], [-1, *outputs[name]["shape"][1:]])
            else:
                out[name] = context[name]
        out["key"] = context["key"]
        out["split"] = context["split"]
        label = table.lookup(context["label"]) if vocabulary else tf.constant(-1, tf.int32)
        return out, label

    dataset = tf.data.TFRecordDataset(files, compression_type=compression_type, num_parallel_reads=tf.data.AUTOTUNE)
    dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    if split is not None:
        dataset = dataset.filter(lambda x, y: tf.equal(x["split"], split))
    if spec_augment:
        dataset = dataset.map(_spec_augment(spec_augment, outputs, seed), num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle:
        dataset = dataset.shuffle(shuffle, seed=seed, reshuffle_each_iteration=True)
    if batch_size:
        dataset = dataset.padded_batch(batch_size)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _spec_augment(options: dict, outputs: dict, seed: int | None):
    """SpecAugment frequency and time masks (Park et al. 2019) for one `[frames, bins]` item.

    A mask's width is drawn uniformly from [0, param) and its start uniformly where it fits, as
    tensorflow-io's `freq_mask` / `time_mask` do, but masked cells take the item's own mean
    rather than 0: for a log-mel in dB, 0 is about the loudest level, not a neutral one.
    """
    import tensorflow as tf

    name = options.get("feature", "logmel")
    if name not in outputs or outputs[name]["level"] != "frame" or len(outputs[name]["shape"]) != 1:
        raise OutputError(f"spec_augment needs a frame-level [frames, bins] feature; {name!r} is not one")
    freq, time = int(options.get("freq_mask", 0)), int(options.get("time_mask", 0))
    if freq < 0 or time < 0:
        raise OutputError(f"spec_augment mask widths must be >= 0, got freq_mask={freq}, time_mask={time}")

    # Op-level seeds, one per random op, never tf.random.set_seed: the caller's global seed (and
    # every other random op of their program) stays as they set it.
    def op_seed(op: int):
        return None if seed is None else seed * 4 + op

    def band(size, param, which):
        """A boolean [size] vector, True on one random run of width in [0, param)."""
        width = tf.random.uniform([], 0, param, dtype=tf.int32, seed=op_seed(2 * which))
        start = tf.random.uniform([], 0, tf.maximum(size - width, 0) + 1, dtype=tf.int32, seed=op_seed(2 * which + 1))
        index = tf.range(size)
        return (index >= start) & (index < start + width)

    def augment(x, y):
        value = x[name]
        shape = tf.shape(value)
        masked = tf.zeros_like(value, dtype=tf.bool)
        if freq:
            masked |= band(shape[1], freq, 0)[tf.newaxis, :]
        if time:
            masked |= band(shape[0], time, 1)[:, tf.newaxis]
        fill = tf.reduce_mean(value)  # NaN-free: an empty item has no cells to mask
        return {**x, name: tf.where(masked, fill, value)}, y

    return augment
