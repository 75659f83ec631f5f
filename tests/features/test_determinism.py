"""An item's features are bit-identical whatever else shares its batch.

Reruns batch items differently (BatchElements sizes adapt to timing), so byte-identical outputs
per key across runs need every extractor to be independent of batch composition and position.
"""

from __future__ import annotations

import numpy as np

from features import Batch, available, build

SR = 16000


def _features_of_item(waveforms, index, extractors):
    batch = Batch.from_waveforms(waveforms, sample_rate=SR)
    n = len(waveforms[index])
    out = {}
    for extractor in extractors:
        outputs = batch.outputs(extractor)
        for spec in extractor.output_specs():
            value = outputs[spec.name][index]
            out[spec.name] = value[: 1 + n // spec.hop_length] if spec.level == "frame" else value
    return out


def test_batch_composition_and_position_do_not_change_bytes():
    rng = np.random.default_rng(11)
    item = (0.3 * rng.standard_normal(SR * 2)).astype(np.float32)
    others = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in (SR * 3, SR, 5000, 2 * SR + 7)]
    extractors = [build(name, {}, sample_rate=SR) for name in available()]
    alone = _features_of_item([item], 0, extractors)
    for waveforms, index in (([item, *others], 0), ([*others[:2], item], 2), ([others[0], item, others[0]], 1)):
        together = _features_of_item(waveforms, index, extractors)
        for name, value in alone.items():
            assert together[name].tobytes() == value.tobytes(), name
