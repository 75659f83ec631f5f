"""features/function.py: plain functions as extractors, their inferred specs, versions and errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from featurebeam.errors import ConfigError, FeatureError
from features import Batch, function, registry
from features.base import OutputSpec, as_output

RATE = 16000


def _module(tmp_path, code: str, name: str = "algos.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


@pytest.fixture(autouse=True)
def _fresh():
    """Each test loads its files afresh (the cache is per process, keyed by the spec text)."""
    function._LOADED.clear()
    yield
    function._LOADED.clear()


def test_outputs_are_inferred_from_the_test_signal(tmp_path):
    path = _module(tmp_path, """
        import numpy as np
        def feats(*, waveform, sample_rate, hop=160):
            frames = 1 + len(waveform) // hop
            return {
                "env": np.zeros((frames, 2), np.float32),
                "count": 3,
                "peaks": [1, 2, len(waveform) % 7],
                "name": "tone",
                "hist": np.arange(4, dtype=np.int16),
                "notes": [{"time": 0.5, "pitch": 69, "label": "A4"}],
            }
    """)
    extractor = registry.build(f"{path}:feats", {}, sample_rate=RATE)
    assert extractor.name == "feats"
    specs = {s.name: s for s in extractor.output_specs()}
    assert specs["feats_env"] == OutputSpec("feats_env", "frame", (2,), hop_length=160, sample_rate=RATE)
    assert specs["feats_count"] == OutputSpec("feats_count", "clip", (), dtype="int64")
    assert specs["feats_peaks"] == OutputSpec("feats_peaks", "clip", (-1,), dtype="int64")
    assert specs["feats_name"] == OutputSpec("feats_name", "clip", (), dtype="string")
    assert specs["feats_hist"] == OutputSpec("feats_hist", "clip", (4,), dtype="int16")
    assert specs["feats_notes"].fields == (("time", "float64"), ("pitch", "int64"), ("label", "string"))


def test_config_key_names_the_instance_and_keyword_arguments_reach_the_function(tmp_path):
    path = _module(tmp_path, """
        import numpy as np
        def gain(*, waveform, sample_rate, factor=1.0):
            return float(np.abs(waveform).max() * factor)
    """)
    one = registry.build("loud", {"function": f"{path}:gain", "factor": 2.0}, sample_rate=RATE)
    two = registry.build("quiet", {"function": f"{path}:gain"}, sample_rate=RATE)
    assert [s.name for s in one.output_specs()] == ["loud"]
    wave = np.full(100, 0.25, np.float32)
    batch = Batch.from_waveforms([wave], sample_rate=RATE)
    assert one.extract(batch)["loud"][0] == 0.5 and two.extract(batch)["quiet"][0] == 0.25
    assert registry.instance_values(one) == {"function": f"{path}:gain", "function_version": one.version, "factor": 2.0}
    # the workers rebuild it from those values, and refuse another version of the file
    again = registry.build("loud", registry.instance_values(one), sample_rate=RATE)
    assert again.version == one.version
    with pytest.raises(ConfigError, match="planned with"):
        registry.build("loud", {**registry.instance_values(one), "function_version": "sha256:0"}, sample_rate=RATE)


def test_a_batch_function_gets_the_padded_batch(tmp_path):
    path = _module(tmp_path, """
        import numpy as np
        def lengths(*, waveforms, lengths, sample_rate):
            return np.asarray(lengths, dtype=np.int64) + waveforms.shape[0] * 0
    """)
    extractor = registry.build(f"{path}:lengths", {}, sample_rate=RATE)
    assert extractor.takes_batch and extractor.output_specs()[0].dtype == "int64"
    batch = Batch.from_waveforms([np.zeros(5, np.float32), np.zeros(9, np.float32)], sample_rate=RATE)
    assert list(extractor.extract(batch)["lengths"]) == [5, 9]


def test_the_version_is_the_files_content_hash(tmp_path):
    path = _module(tmp_path, "def f(*, waveform, sample_rate):\n    return 1.0\n")
    first = registry.build(f"{path}:f", {}, sample_rate=RATE)
    function._LOADED.clear()
    _module(tmp_path, "def f(*, waveform, sample_rate):\n    return 2.0\n")
    second = registry.build(f"{path}:f", {}, sample_rate=RATE)
    assert first.version.startswith("sha256:") and first.version != second.version
    record = second.describe()
    assert record["function"]["file"] == "algos.py" and record["version"] == second.version


def test_a_function_from_a_file_pickles_by_value_for_workers_that_cannot_see_it(tmp_path):
    path = _module(tmp_path, """
        import numpy as np
        SCALE = 3.0
        def helper(x):
            return x * SCALE
        def f(*, waveform, sample_rate):
            return float(helper(np.float32(waveform.sum())))
    """)
    payload = function.loaded_functions({"f": {"function": f"{path}:f"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "algos.py").unlink()  # the worker has no file
    code = (
        "import pickle, sys, numpy as np; loaded = pickle.loads(sys.stdin.buffer.read()); "
        "fn = next(iter(loaded.values()))[0]; print(fn(waveform=np.ones(4, np.float32), sample_rate=1))"
    )
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, cwd=elsewhere, check=True)
    assert out.stdout.decode().strip() == "12.0"


@pytest.mark.parametrize(
    "code, spec, message",
    [
        (None, "nowhere.py:f", "no such file"),
        ("def f(:\n", "{path}:f", "cannot import it: SyntaxError"),
        ("def g(*, waveform, sample_rate):\n    return 1\n", "{path}:f", "defines no function 'f'"),
        ("def f(*, waveform, sample_rate):\n    x = 1\n    raise ValueError('boom')\n", "{path}:f", "at algos.py:3: ValueError: boom"),
        ("def f(*, waveform, sample_rate):\n    return 1j\n", "{path}:f", "dtype complex128"),
        ("def f(*, waveform, sample_rate):\n    return object()\n", "{path}:f", "dtype object"),
        ("def f(*, waveform, sample_rate):\n    return []\n", "{path}:f", "empty list on both test signals"),
        ("def f(*, waveform, sample_rate):\n    return [{'t': [1]}]\n", "{path}:f", "event fields must be numbers or strings"),
    ],
)
def test_launch_failures_are_one_line_config_errors(tmp_path, code, spec, message):
    path = _module(tmp_path, code) if code else ""
    with pytest.raises(ConfigError) as info:
        registry.build(spec.format(path=path), {}, sample_rate=RATE)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_exception_on_an_item_names_the_function_file_and_line(tmp_path):
    path = _module(tmp_path, """
        def f(*, waveform, sample_rate):
            if len(waveform) == 7:
                raise RuntimeError("seven")
            return 1.0
    """)
    extractor = registry.build(f"{path}:f", {}, sample_rate=RATE)
    with pytest.raises(FeatureError, match=r"function .*algos.py:f raised at algos.py:4: RuntimeError: seven"):
        extractor.extract(Batch.from_waveforms([np.zeros(7, np.float32)], sample_rate=RATE))


def test_declared_outputs_replace_inference(tmp_path):
    path = _module(tmp_path, "def f(*, waveform, sample_rate):\n    return {'notes': []}\n")
    extractor = registry.build(
        "n", {"function": f"{path}:f", "outputs": {"notes": {"dtype": "events", "fields": {"time": "float64"}}}}, sample_rate=RATE
    )
    assert extractor.output_specs() == (OutputSpec("n_notes", "clip", (-1,), dtype="events", fields=(("time", "float64"),)),)


def test_output_specs_check_dtypes_shapes_and_fields():
    with pytest.raises(FeatureError, match="dtype 'complex64'"):
        OutputSpec("x", "clip", (), dtype="complex64")
    with pytest.raises(FeatureError, match="only the first dimension may be -1"):
        OutputSpec("x", "clip", (2, -1))
    with pytest.raises(FeatureError, match="clip-level outputs only"):
        OutputSpec("x", "frame", (-1,), hop_length=4, sample_rate=16)
    with pytest.raises(FeatureError, match="need their fields"):
        OutputSpec("x", "clip", (-1,), dtype="events")
    spec = OutputSpec("x", "clip", (-1,), dtype="events", fields=(("t", "float64"), ("n", "int64"), ("s", "string")))
    assert as_output(spec, [{"t": 1, "n": 2.0, "s": 3}]) == ({"t": 1.0, "n": 2, "s": "3"},)
    with pytest.raises(FeatureError, match="fractional"):
        as_output(OutputSpec("x", "clip", (), dtype="int64"), 1.5)
    assert OutputSpec.from_json(spec.to_json()) == spec


def test_the_launcher_stops_with_one_line_and_exit_2(tmp_path, capsys):
    from pipelines import extract

    (tmp_path / "audio").mkdir()
    path = _module(tmp_path, "def f(*, waveform, sample_rate):\n    return {'bad': 1j}\n")
    code = extract.main([f"--dataset={tmp_path / 'audio'}", f"--features=logmel,{path}:f", f"--output={tmp_path / 'runs'}"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "output 'f_bad'" in line and "dtype complex128" in line
    assert not (tmp_path / "runs").exists()


def test_an_items_exception_is_its_dead_letter_naming_function_file_and_line(tmp_path):
    """ExtractFn as a worker runs it: the function arrives packed, one item fails, the others pass."""
    import apache_beam as beam

    from featurebeam.elements import Clip
    from pipelines.transforms import ExtractFn

    path = _module(tmp_path, """
        import numpy as np
        def f(*, waveform, sample_rate):
            if len(waveform) == 3000:
                raise ValueError("three thousand")
            return {"n": len(waveform), "tag": "ok"}
    """)
    features = {"f": {"function": f"{path}:f"}}
    extractor = registry.build("f", features["f"], sample_rate=RATE)
    fn = ExtractFn(
        features={"f": registry.instance_values(extractor)}, sample_rate=RATE, max_batch_samples=RATE * 10,
        functions=function.loaded_functions(features),
    )
    function._LOADED.clear()  # the worker knows only what the DoFn carries
    fn.setup()

    def clip(n):
        return Clip(key=f"k{n}", item_key=f"k{n}", uri=f"u{n}", label=None, split=None, metadata=(), start_sample=0,
                    segment_index=0, last_segment=True, silent=False, sample_rate=RATE, source_sample_rate=RATE,
                    source_channels=1, source_duration_seconds=n / RATE, waveform=np.zeros(n, np.float32))

    out = list(fn.process([clip(2000), clip(3000)]))
    rows = [row for o in out if isinstance(o, list) for row in o]
    dead = [o.value for o in out if isinstance(o, beam.pvalue.TaggedOutput)]
    assert [(r.key, int(r.features["f_n"]), str(r.features["f_tag"])) for r in rows] == [("k2000", 2000, "ok")]
    (letter,) = dead
    assert letter.key == "k3000" and "algos.py:f raised at algos.py:5: ValueError: three thousand" in letter.message
