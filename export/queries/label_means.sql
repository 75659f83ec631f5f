-- Per-label means of one run's clip summaries: spectral centroid, bandwidth, RMS, flatness and mean log-mel level.
-- Needs the default extractors (logmel, spectral); a run without one gives NULLs for its columns.
-- @param run_id STRING the run to summarise (runs.run_id; see --saved runs)
WITH per_record AS (
  SELECT
    label,
    spectral.spectral_centroid_mean AS centroid_hz,
    spectral.spectral_bandwidth_mean AS bandwidth_hz,
    spectral.spectral_rms_mean AS rms,
    spectral.spectral_flatness_mean AS flatness,
    (SELECT AVG(v) FROM UNNEST(logmel.logmel_mean) AS v) AS logmel_db
  FROM features
  WHERE run_id = @run_id
)
SELECT
  label,
  COUNT(*) AS records,
  AVG(centroid_hz) AS centroid_hz,
  AVG(bandwidth_hz) AS bandwidth_hz,
  AVG(rms) AS rms,
  AVG(flatness) AS flatness,
  AVG(logmel_db) AS logmel_db
FROM per_record
GROUP BY label
ORDER BY label
