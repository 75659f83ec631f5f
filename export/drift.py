"""Drift between two runs, from their statistics alone (never their shards).

Per feature of the unsliced statistics, the distance TFDV's comparators use: L-infinity between
the value frequencies of categorical features (labels, splits), Jensen-Shannon divergence
(base 2, so in [0, 1]) between the histograms of numeric ones. The two runs' STANDARD histograms
have different bucket edges, so both are re-spread onto the union of their edges, assuming
uniform mass within a bucket (a bucket with low == high is a point mass), as TFDV does; NaNs
count as one more bucket, so a feature that starts producing NaNs drifts too. A feature present
in one run only (`n_mels` 64 -> 32 drops `logmel/frames/32` ... `/63`) is flagged as well.

Plus the differences of configuration and versions recorded in the two run.json files.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from export import metadata, statistics

# Jensen-Shannon and L-infinity both lie in [0, 1]. Two runs of one command measure 0 (the
# records are byte-identical and the sketches deterministic); 0.1 tolerates sketch noise and
# small sampling changes while catching a changed parameter: on the sample set, n_mels 64 -> 32
# moves the 32 shared log-mel bands by JS 0.13 to 0.29 over frames (0.09 to 0.33 over clip
# means), all bands together by 0.098 (just under), and drops 32 bands, while every other
# feature stays at 0.
DEFAULT_THRESHOLD = 0.1


@dataclasses.dataclass(frozen=True)
class FeatureDrift:
    path: str
    kind: str  # "numeric" | "categorical"
    distance: float | None  # None when the feature is in one run only
    status: str  # "compared" | "only in A" | "only in B"
    flagged: bool


@dataclasses.dataclass(frozen=True)
class Comparison:
    run_a: str
    run_b: str
    threshold: float
    config: list[tuple[str, Any, Any]]  # (key, value in A, value in B) that differ
    features: list[FeatureDrift]
    # Why features were not compared: one line per run without statistics (--statistics=off).
    statistics_absent: list[str] = dataclasses.field(default_factory=list)

    @property
    def flagged(self) -> list[FeatureDrift]:
        return [f for f in self.features if f.flagged]


def _histogram(feature) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    for histogram in feature.num_stats.histograms:
        if histogram.type == histogram.STANDARD:
            b = histogram.buckets
            return (
                np.array([x.low_value for x in b]),
                np.array([x.high_value for x in b]),
                np.array([x.sample_count for x in b]),
                float(histogram.num_nan),
            )
    return np.zeros(0), np.zeros(0), np.zeros(0), 0.0


def _distribution(hist, edges: np.ndarray) -> np.ndarray:
    lows, highs, counts, nan = hist
    if len(edges) < 2:  # every value of both runs is one point
        cells = np.array([counts.sum()])
    else:
        cells = statistics.interval_mass(lows, highs, counts, edges)
    return np.append(cells, nan)


def jensen_shannon(hist_a, hist_b) -> float:
    """Jensen-Shannon divergence (base 2) of two `(lows, highs, counts, num_nan)` histograms."""
    edges = np.unique(np.concatenate([hist_a[0], hist_a[1], hist_b[0], hist_b[1]]))
    p, q = _distribution(hist_a, edges), _distribution(hist_b, edges)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0 if p.sum() == q.sum() else 1.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x):
        keep = x > 0
        return float(np.sum(x[keep] * np.log2(x[keep] / m[keep])))

    return max(0.0, min(1.0, (kl(p) + kl(q)) / 2))


def l_infinity(freq_a: dict[str, float], freq_b: dict[str, float]) -> float:
    """Largest difference of the normalised frequencies of any value."""
    total_a, total_b = sum(freq_a.values()) or 1, sum(freq_b.values()) or 1
    values = set(freq_a) | set(freq_b)
    return max((abs(freq_a.get(v, 0) / total_a - freq_b.get(v, 0) / total_b) for v in values), default=0.0)


def _frequencies(feature) -> dict[str, float]:
    return {v.value: v.frequency for v in feature.string_stats.top_values}


def feature_drift(stats_a, stats_b, *, threshold: float) -> list[FeatureDrift]:
    a = {"/".join(f.path.step): f for f in stats_a.datasets[0].features}
    b = {"/".join(f.path.step): f for f in stats_b.datasets[0].features}
    out = []
    for path in sorted(set(a) | set(b)):
        fa, fb = a.get(path), b.get(path)
        kind = "categorical" if (fa or fb).HasField("string_stats") else "numeric"
        if fa is None or fb is None:
            out.append(FeatureDrift(path, kind, None, "only in B" if fa is None else "only in A", True))
            continue
        if kind == "categorical":
            distance = l_infinity(_frequencies(fa), _frequencies(fb))
        else:
            distance = jensen_shannon(_histogram(fa), _histogram(fb))
        out.append(FeatureDrift(path, kind, distance, "compared", distance > threshold))
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _described(run: dict) -> dict[str, Any]:
    """What two runs' provenance is compared on: config, extractor versions, code and dataset."""
    return _flatten(
        {
            "config": run.get("config", {}),
            "extractors": {e["name"]: e["version"] for e in run.get("extractors", [])},
            "featurebeam_version": run.get("featurebeam_version"),
            "git_commit": run.get("git_commit"),
            "beam_version": run.get("beam", {}).get("version"),
            "dataset": {k: v for k, v in run.get("dataset", {}).items()},
        }
    )


def config_differences(run_a: dict, run_b: dict) -> list[tuple[str, Any, Any]]:
    a, b = _described(run_a), _described(run_b)
    missing = "<absent>"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def compare(run_a: str, run_b: str, *, threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    """Compare two finished runs by their run.json and statistics/ only."""
    from featurebeam.errors import ConfigError, OutputError

    if not 0 <= threshold <= 1:
        raise ConfigError(f"--threshold must lie in [0, 1] (both distances do), got {threshold}")
    runs = []
    for run_dir in (run_a, run_b):
        try:
            runs.append(metadata.read_json(metadata.join(run_dir, metadata.RUN_JSON)))
        except Exception:
            raise OutputError(f"{run_dir} has no readable run.json: pass a finished featurebeam run folder") from None
    stats, absent = [], []
    for name, run_dir, run in (("A", run_a, runs[0]), ("B", run_b, runs[1])):
        try:
            stats.append(statistics.read(run_dir))
        except OutputError:
            off = statistics.absent(run)
            if off is None:  # a run that should have them: the error names the fix
                raise
            absent.append(f"{name}: {off}")
    return Comparison(
        run_a=run_a,
        run_b=run_b,
        threshold=threshold,
        config=config_differences(*runs),
        features=[] if absent else feature_drift(*stats, threshold=threshold),
        statistics_absent=absent,
    )


def _short(value: Any, width: int = 60) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def render(comparison: Comparison, *, max_lines: int = 40) -> str:
    """The text `python -m pipelines.compare` prints."""
    lines = [f"A: {comparison.run_a}", f"B: {comparison.run_b}", ""]
    if comparison.config:
        lines.append(f"configuration and versions: {len(comparison.config)} differences")
        for key, a, b in comparison.config:
            lines.append(f"  {key}: {_short(a)} -> {_short(b)}")
    else:
        lines.append("configuration and versions: identical")
    lines.append("")
    if comparison.statistics_absent:
        lines.append("features: not compared (drift is measured from both runs' statistics)")
        lines += [f"  {line}" for line in comparison.statistics_absent]
        lines.append("  compute them with `featurebeam statistics RUN_DIR` (python -m export.statistics RUN_DIR)")
        return "\n".join(lines)
    compared = [f for f in comparison.features if f.status == "compared"]
    top = max(compared, key=lambda f: f.distance, default=None)
    lines.append(
        f"features: {len(comparison.features)} ({len(compared)} in both runs), {len(comparison.flagged)} flagged "
        f"(threshold {comparison.threshold:g}; Jensen-Shannon for numeric, L-infinity for categorical)"
        + (f"; largest distance {top.distance:.4f} ({top.path})" if top else "")
    )
    # Per-dimension features (`logmel/frames/17`) are reported per parent, or 64 lines would
    # say one thing.
    groups: dict[str, list[FeatureDrift]] = {}
    for f in comparison.features:
        parent, _, last = f.path.rpartition("/")
        groups.setdefault(f"{parent}/<d>" if last.isdigit() else f.path, []).append(f)
    entries = []
    for name, members in groups.items():
        flagged = [f for f in members if f.flagged]
        if not flagged:
            continue
        measured = [f for f in flagged if f.distance is not None]
        worst = max(measured, key=lambda f: f.distance, default=None)
        measure = "L-inf" if members[0].kind == "categorical" else "JS"
        if len(members) == 1:
            text = f"{name}: {flagged[0].status}" if worst is None else f"{name}: {measure} {worst.distance:.4f}"
        else:
            parts = []
            if measured:
                both = sum(1 for f in members if f.status == "compared")
                parts.append(f"{len(measured)} of {both} dimensions in both runs above threshold, max {measure} {worst.distance:.4f} at {worst.path}")
            for status in ("only in A", "only in B"):
                n = sum(1 for f in flagged if f.status == status)
                if n:
                    parts.append(f"{n} dimensions {status}")
            text = f"{name}: " + "; ".join(parts)
        entries.append((worst.distance if worst else 2.0, text))
    for _, text in sorted(entries, key=lambda e: -e[0])[:max_lines]:
        lines.append(f"  DRIFT {text}")
    if len(entries) > max_lines:
        lines.append(f"  ... and {len(entries) - max_lines} more")
    return "\n".join(lines)


def to_json(comparison: Comparison) -> dict[str, Any]:
    return {
        "run_a": comparison.run_a,
        "run_b": comparison.run_b,
        "threshold": comparison.threshold,
        "config": [{"key": k, "a": a, "b": b} for k, a, b in comparison.config],
        "features": [dataclasses.asdict(f) for f in comparison.features],
        "flagged": [f.path for f in comparison.flagged],
        "statistics_absent": comparison.statistics_absent,
    }
