"""The training loader on a real run: shapes from the run's schema, labels, splits, SpecAugment,
and the README's Keras example beating chance on the held-out split."""

from __future__ import annotations

import numpy as np
import pytest

import export
from datasets.sample import CLASSES, CLIPS_PER_CLASS
from featurebeam.errors import OutputError

pytestmark = pytest.mark.slow


def test_loader_yields_batches_with_schema_shapes(sample_run):
    run_dir = sample_run["outputs"]["run_dir"]
    ds = export.load_tfrecords(run_dir, batch_size=8)
    x, y = next(iter(ds))
    assert x["logmel"].shape[0] == 8 and x["logmel"].shape[-1] == 64
    assert x["mfcc"].shape[-1] == 20
    assert x["spectral_centroid"].ndim == 2  # [batch, frames]: per-frame scalars are squeezed
    assert x["summary_logmel_mean"].shape == (8, 64)
    assert ds.element_spec[0]["logmel"].shape.as_list() == [None, None, 64]
    assert y.dtype.name == "int32" and set(y.numpy()) <= set(range(len(CLASSES)))
    np.testing.assert_array_equal(x["logmel_frames"].numpy(), np.full(8, 1 + 32000 // 256))


def test_loader_labels_and_splits_match_run(sample_run):
    run_dir = sample_run["outputs"]["run_dir"]
    labels = sample_run["labels"]
    seen = {"train": 0, "test": 0}
    for split in seen:
        for x, y in export.load_tfrecords(run_dir, features=["logmel"], split=split, batch_size=None):
            key = x["key"].numpy().decode()
            assert labels[int(y)] == key.split("/")[1]  # sample keys are sample/<label>/<file>
            seen[split] += 1
    assert seen == sample_run["split_counts"]
    assert seen["test"] == len(CLASSES) * (CLIPS_PER_CLASS // 4)


def test_spec_augment_masks_bands_and_frames_with_the_item_mean(sample_run):
    run_dir = sample_run["outputs"]["run_dir"]
    plain = export.load_tfrecords(run_dir, features=["logmel"], batch_size=None)
    masked = export.load_tfrecords(
        run_dir, features=["logmel"], batch_size=None, spec_augment={"feature": "logmel", "freq_mask": 16, "time_mask": 30}, seed=3
    )
    masked_bands = masked_frames = 0
    for (a, _), (b, _) in zip(plain, masked):
        a, b = a["logmel"].numpy(), b["logmel"].numpy()
        changed = a != b
        if not changed.any():
            continue
        fill = b[changed][0]
        # Masked cells hold one value, the item's mean level: never 0 dB, which for a log-mel is
        # about the loudest level (the sample's log-mels lie between -91 and +27 dB).
        assert np.all(b[changed] == fill)
        assert fill == pytest.approx(float(a.mean(dtype=np.float64)), abs=1e-3) and abs(fill) > 1
        cells = b == fill
        band, frame = np.all(cells, axis=0), np.all(cells, axis=1)  # whole bins / whole frames masked
        assert np.all(~changed | band[None, :] | frame[:, None])  # nothing but whole bands and frames changes
        assert band.sum() < 16 and frame.sum() < 30  # widths are drawn from [0, param)
        masked_bands += int(band.any())
        masked_frames += int(frame.any())
    assert masked_bands > 10 and masked_frames > 10
    with pytest.raises(OutputError, match="mask widths must be >= 0"):
        export.load_tfrecords(run_dir, features=["logmel"], spec_augment={"feature": "logmel", "freq_mask": -1})


def test_loader_errors_name_the_fix(sample_run, tmp_path):
    with pytest.raises(OutputError, match="has no run.json"):
        export.load_tfrecords(str(tmp_path))
    with pytest.raises(OutputError, match="feature 'nope' is not in run"):
        export.load_tfrecords(sample_run["outputs"]["run_dir"], features=["nope"])


def test_keras_example_beats_chance(sample_run):
    from examples.train_keras import train

    result = train(sample_run["outputs"]["run_dir"], epochs=40, seed=0)
    assert result["test_items"] == 15
    assert result["chance"] == pytest.approx(0.2)
    assert result["accuracy"] >= 0.6  # three times chance on 15 held-out clips


def test_spec_augment_keeps_the_callers_global_tensorflow_seed(sample_run):
    import tensorflow as tf

    tf.random.set_seed(123)
    expected = tf.random.uniform([4]).numpy()
    tf.random.set_seed(123)
    masked = export.load_tfrecords(
        sample_run["outputs"]["run_dir"], features=["logmel"], batch_size=None, spec_augment={"feature": "logmel", "freq_mask": 8}, seed=3
    )
    next(iter(masked))
    np.testing.assert_array_equal(tf.random.uniform([4]).numpy(), expected)  # set_seed(3) would change it
