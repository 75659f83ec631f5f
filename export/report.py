"""A run's report: one self-contained `report.html` (PNGs embedded) a person opens offline.

It reads only small things, so it costs the same on a run of millions: run.json (metadata,
counts, failures), statistics/statistics.pb (distributions, per label from its label slices) and
a bounded sample of records (at most `items_per_label` per label, from at most `max_rows` Parquet
rows) whose log-mels are drawn beside the waveform decoded again from the item's source.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from typing import Any, Sequence

import numpy as np

from export import formats, metadata, statistics

REPORT_HTML = "report.html"
_LOG = logging.getLogger("featurebeam")
_MAX_SOURCE_SECONDS = 600  # longer sources are not decoded again for a waveform picture


def _png(fig, *, margins: dict | bool | None = None) -> str:
    """The figure as base64 PNG. Fixed margins, not constrained layout or bbox_inches="tight":
    each of those draws the figure once more, which doubled the report's time."""
    import matplotlib.pyplot as plt

    if margins is not False:  # False: the figure placed its axes itself
        fig.subplots_adjust(**(margins or {"left": 0.16, "right": 0.97, "top": 0.9, "bottom": 0.24}))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)  # no bbox_inches="tight": it draws every figure twice
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _exports(run: dict[str, Any]) -> str:
    export = formats.of_run(run).describe()
    codecs = {"tfrecord": export["tfrecord_compression"], "parquet": export["parquet_compression"], "tfds": "none"}
    return ", ".join(f"{name} ({codecs.get(name, 'none')})" for name in export["formats"])


def _stage_table(stage_seconds: dict[str, float], wall: float) -> str:
    """Seconds per stage in pipeline order, with each one's share of the summed stage time."""
    from featurebeam.stages import STAGES

    total = sum(stage_seconds.values()) or 1.0
    order = sorted(stage_seconds, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))
    rows = [(stage, stage_seconds[stage], f"{stage_seconds[stage] / total:.0%}") for stage in order]
    note = f"<p class='muted'>Summed over workers; wall time {wall:.1f} s. decode includes reading and resampling.</p>"
    return _table(rows, ["stage", "seconds", "share"]) + note


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def sample_records(
    run_dir: str, *, feature: str | None, labels: Sequence[str], items_per_label: int, max_rows: int
) -> list[dict[str, Any]]:
    """Up to `items_per_label` records per label (or in all, for an unlabelled run), reading at
    most `max_rows` Parquet rows in shard order; `feature` is the frame-level output to keep."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    wanted = {label: items_per_label for label in labels} or {"": items_per_label}
    columns = ["key", "uri", "label", "start_sample", "num_samples", "sample_rate", "source_duration_seconds"]
    if feature:
        columns += [feature, f"{feature}_shape"]
    picked: list[dict[str, Any]] = []
    read = 0
    for path in metadata.matching(metadata.join(run_dir, "parquet", "part-*.parquet")):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=256, columns=columns):
                small = batch.drop_columns([feature]) if feature else batch
                for i, record in enumerate(small.to_pylist()):
                    read += 1
                    label = record["label"] if labels else ""
                    if wanted.get(label, 0) > 0:
                        wanted[label] -= 1
                        if feature:  # as a NumPy array: a long record's frames would be millions of Python floats
                            record[feature] = batch.column(feature)[i].values.to_numpy(zero_copy_only=False)
                        picked.append(record)
                    if read >= max_rows or not any(wanted.values()):
                        return picked
    return picked


def _waveform(record: dict[str, Any]) -> np.ndarray | None:
    """The record's audio decoded again from its source, or None when that is not possible."""
    from featurebeam import audio

    if record["source_duration_seconds"] > _MAX_SOURCE_SECONDS:
        return None
    try:
        decoded = audio.decode(audio.read_bytes(record["uri"]), uri=record["uri"])
        mono = audio.condition(decoded, sample_rate=record["sample_rate"], uri=record["uri"])
    except Exception as exc:  # a moved or unreadable source only costs the picture
        _LOG.warning("report: no waveform for %s: %s", record["key"], exc)
        return None
    return mono[record["start_sample"] : record["start_sample"] + record["num_samples"]]


def _example_figure(record: dict[str, Any], feature: str | None, frame_rate: float | None) -> str:
    import matplotlib.pyplot as plt

    wave = _waveform(record)
    fig = plt.figure(figsize=(6, 3.6))
    top, bottom = fig.add_axes((0.12, 0.66, 0.72, 0.26)), fig.add_axes((0.12, 0.12, 0.72, 0.44))
    if wave is not None:
        t = np.arange(len(wave)) / record["sample_rate"]
        top.plot(t, wave, linewidth=0.5, color="#1f5fa8")
        top.set_xlim(0, max(t[-1], 1e-3) if len(t) else 1)
    else:
        top.text(0.5, 0.5, "source not readable: no waveform", ha="center", va="center", transform=top.transAxes)
    top.set_ylabel("amplitude")
    top.set_title(f"{record['label'] or '(unlabelled)'}: {record['key']}", fontsize=9)
    if feature and record.get(feature) is not None:
        values = np.asarray(record[feature], dtype=np.float32).reshape(record[f"{feature}_shape"])
        extent = [0, len(values) / frame_rate if frame_rate else len(values), 0, values.shape[1]]
        image = bottom.imshow(values.T, origin="lower", aspect="auto", cmap="magma", extent=extent)
        fig.colorbar(image, cax=fig.add_axes((0.86, 0.12, 0.02, 0.44)), label=feature)
        bottom.set_ylabel("band")
    bottom.set_xlabel("seconds" if frame_rate else "frame")
    return _png(fig, margins=False)


def _quartiles(num) -> dict[str, float] | None:
    for histogram in num.histograms:
        if histogram.type == histogram.QUANTILES and histogram.buckets:
            bounds = [histogram.buckets[0].low_value] + [b.high_value for b in histogram.buckets]
            at = lambda q: float(np.interp(q, np.linspace(0, 1, len(bounds)), bounds))  # noqa: E731
            return {"whislo": bounds[0], "q1": at(0.25), "med": at(0.5), "q3": at(0.75), "whishi": bounds[-1]}
    return None


def _per_label_figures(stats) -> list[tuple[str, str]]:
    """Box plots (from each label slice's quantiles) of every per-record scalar feature, and the
    mean over records per dimension and label for per-record vectors."""
    import matplotlib.pyplot as plt

    slices = [d for d in stats.datasets if d.name.startswith("label=")]
    if not slices:
        return []
    labels = [d.name[len("label=") :] for d in slices]
    by_slice = [{"/".join(f.path.step): f for f in d.features if f.HasField("num_stats")} for d in slices]
    scalars = [p for p in by_slice[0] if not p.split("/")[-1].isdigit() and p not in statistics.RECORD_FEATURES[1:]]
    vectors = sorted({p.rsplit("/", 1)[0] for p in by_slice[0] if p.split("/")[-1].isdigit() and "/" in p})
    out = []
    for path in scalars:
        boxes = []
        for label, features in zip(labels, by_slice):
            box = _quartiles(features[path].num_stats) if path in features else None
            if box:
                boxes.append({**box, "label": label})
        if not boxes:
            continue
        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        ax.bxp(boxes, showfliers=False)
        ax.set_title(path, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        out.append((path, _png(fig)))
    for path in vectors:
        fig, ax = plt.subplots(figsize=(6, 3))
        for label, features in zip(labels, by_slice):
            dims = sorted(
                (int(p.rsplit("/", 1)[1]), f) for p, f in features.items() if p.split("/")[-1].isdigit() and p.rsplit("/", 1)[0] == path
            )
            ax.plot([d for d, _ in dims], [f.num_stats.mean for _, f in dims], label=label, linewidth=1.2)
        ax.set_title(f"{path}: mean per dimension and label", fontsize=9)
        ax.set_xlabel("dimension")
        ax.legend(fontsize=7, ncol=2)
        out.append((path, _png(fig, margins={"left": 0.11, "right": 0.98, "top": 0.9, "bottom": 0.16})))
    return out


def _histogram_figure(feature, title: str, xlabel: str) -> str | None:
    import matplotlib.pyplot as plt

    histogram = next((h for h in feature.num_stats.histograms if h.type == h.STANDARD), None)
    if histogram is None or not histogram.buckets:
        return None
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    lows = [b.low_value for b in histogram.buckets]
    widths = [max(b.high_value - b.low_value, 1e-9 + abs(b.low_value) * 0.01) for b in histogram.buckets]
    ax.bar(lows, [b.sample_count for b in histogram.buckets], width=widths, align="edge", color="#3b7dd8", edgecolor="white")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items")
    return _png(fig, margins={"left": 0.16, "right": 0.96, "top": 0.9, "bottom": 0.2})


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;font-size:.9em;text-align:left}
th{background:#f3f3f3}.grid{display:flex;flex-wrap:wrap;gap:.8em}.grid img{border:1px solid #eee}
pre{background:#f7f7f7;padding:.6em;font-size:.8em;overflow:auto;max-height:24em}.muted{color:#777}
"""


def render(run_dir: str, *, items_per_label: int = 2, max_rows: int = 5000) -> str:
    """The report's HTML for a finished run."""
    import matplotlib

    matplotlib.use("Agg")
    run = metadata.read_json(metadata.join(run_dir, metadata.RUN_JSON))
    features_json = metadata.read_json(metadata.join(run_dir, metadata.FEATURES_JSON))
    outputs = {o["name"]: o for o in features_json["outputs"]}
    frame_vectors = [n for n, o in outputs.items() if o["level"] == "frame" and len(o["shape"]) == 1]
    picture = "logmel" if "logmel" in frame_vectors else (frame_vectors[0] if frame_vectors else None)
    try:
        stats = statistics.read(run_dir)
    except Exception as exc:
        # A run extracted with --statistics=off says so, with the command that computes them later.
        off = statistics.absent(run)
        stats, stats_error = None, (f"{off}; compute them with `featurebeam statistics {run_dir}`." if off else str(exc))

    counts, wall = run["counts"], run.get("wall_seconds") or 0
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>featurebeam run {html.escape(run['run_id'])}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body>")
    parts.append(f"<h1>Run {html.escape(run['run_id'])} <span class='muted'>({html.escape(run['dataset'].get('name', ''))})</span></h1>")
    parts.append(
        _table(
            [
                ("run folder", run["outputs"]["run_dir"]),
                ("dataset", run["dataset"].get("uri", "")),
                ("started / finished", f"{run.get('started')} / {run.get('finished')}"),
                ("wall time", f"{wall:.1f} s"),
                ("audio", f"{run['audio_seconds']:.1f} s ({run['audio_seconds'] / 3600:.4f} h)"),
                ("throughput", f"{run['audio_seconds'] / wall:.1f} audio s per wall s, {counts['records'] / wall:.2f} records/s" if wall else "n/a"),
                ("featurebeam", f"{run.get('featurebeam_version')} (git {run.get('git_commit')})"),
                ("Beam", f"{run.get('beam', {}).get('version')} on {run.get('beam', {}).get('runner')}"),
                ("extractors", ", ".join(f"{e['name']}@{e['version']}" for e in run["extractors"])),
                ("exports", _exports(run)),
            ]
        )
    )
    parts.append("<h2>Counts</h2>")
    parts.append(_table([(k, v) for k, v in counts.items()], ["", "count"]))
    parts.append(_table([(k or "(none)", v) for k, v in run.get("label_counts", {}).items()], ["label", "records"]))
    parts.append(_table([(k or "(none)", v) for k, v in run.get("split_counts", {}).items()], ["split", "records"]))
    if run.get("stage_seconds"):
        parts.append("<h3>Time per stage</h3>" + _stage_table(run["stage_seconds"], wall))

    failures = run.get("failures", {})
    parts.append(f"<h2>Failures ({failures.get('failed', 0)})</h2>")
    if failures.get("failed"):
        parts.append(_table(sorted(failures.get("by_stage", {}).items()), ["stage", "dead letters"]))
        parts.append(_table([(r["reason"], r["count"], r["example"]) for r in failures.get("reasons", [])], ["stage: reason", "count", "example"]))
        parts.append(f"<p class='muted'>Every dead letter is in {html.escape(run['outputs']['run_dir'])}/errors/.</p>")
    else:
        parts.append("<p>No item failed.</p>")

    parts.append(f"<h2>Examples: waveform and {html.escape(picture or 'features')}</h2>")
    if formats.of_run(run).writes(formats.PARQUET):
        records = sample_records(run_dir, feature=picture, labels=run.get("labels", []), items_per_label=items_per_label, max_rows=max_rows)
        frame_rate = outputs[picture].get("frame_rate") if picture else None
        parts.append("<div class='grid'>" + "".join(_img(_example_figure(r, picture, frame_rate), r["key"]) for r in records) + "</div>")
    else:  # examples are read from Parquet by column; everything else here comes from run.json and statistics
        parts.append("<p class='muted'>No examples: this run has no Parquet shards (it was written with "
                     "--formats=tfrecord); rerun with --formats=tfrecord,parquet to see them.</p>")

    parts.append("<h2>Feature distributions per label</h2>")
    if stats is None:
        parts.append(f"<p class='muted'>{html.escape(stats_error)}</p>")
    else:
        figures = _per_label_figures(stats)
        parts.append(
            "<p class='muted'>Boxes: quartiles of each label's per-record values (clip means for frame-level "
            "features), whiskers: min and max.</p>"
            if figures
            else "<p class='muted'>The run has no labels.</p>"
        )
        parts.append("<div class='grid'>" + "".join(_img(png, path) for path, png in figures) + "</div>")
        overall = {"/".join(f.path.step): f for f in stats.datasets[0].features}
        parts.append("<h2>Inputs</h2><div class='grid'>")
        for path, title, xlabel in (
            ("source_duration_seconds", "input duration", "seconds"),
            ("source_sample_rate", "input sample rate", "Hz"),
        ):
            png = _histogram_figure(overall[path], title, xlabel) if path in overall else None
            if png:
                parts.append(_img(png, title))
        parts.append("</div>")
        summary = statistics.summary(stats)
        rows = [(p, s["count"], s["mean"], s["std"], s["min"], s["median"], s["max"], s["nan"], s["zeros"]) for p, s in summary["numeric"].items()]
        parts.append("<h2>Feature statistics</h2>")
        parts.append(_table(rows, ["feature", "values", "mean", "std", "min", "median", "max", "NaN", "zeros"]))
        parts.append(f"<p class='muted'>Per dimension, with histograms: {html.escape(summary['file'])} (Facets, TFDV).</p>")

    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre>{html.escape(json.dumps(run.get('config', {}), indent=2, sort_keys=True))}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(run_dir: str, **options) -> str:
    """Write `<run_dir>/report.html`; returns its path."""
    path = metadata.join(run_dir, REPORT_HTML)
    metadata.write_atomic(path, render(run_dir, **options))
    return path
