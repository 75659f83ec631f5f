-- Per-label mean of each log-mel band (band 0 is the lowest) over one run's records.
-- @param run_id STRING the run to summarise (runs.run_id; see --saved runs)
SELECT
  label,
  i AS band,
  AVG(v) AS mean_db,
  COUNT(*) AS records
FROM features, UNNEST(logmel.logmel_mean) AS v WITH OFFSET AS i
WHERE run_id = @run_id
GROUP BY label, band
ORDER BY label, band
