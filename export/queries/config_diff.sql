-- What differs between two runs: settings, dataset, code, and each extractor's version and config.
-- @param run_a STRING the first run (runs.run_id)
-- @param run_b STRING the second run (runs.run_id)
WITH
  picked AS (
    SELECT
      run_id, config_hash, sample_rate, segment_seconds, dataset.name AS dataset_name,
      dataset.fingerprint AS dataset_fingerprint, featurebeam_version, git_commit, extractors
    FROM runs
    WHERE run_id IN (@run_a, @run_b)
  ),
  a AS (SELECT * FROM picked WHERE run_id = @run_a),
  b AS (SELECT * FROM picked WHERE run_id = @run_b),
  settings AS (
    SELECT 'config_hash' AS setting, a.config_hash AS run_a, b.config_hash AS run_b FROM a CROSS JOIN b
    UNION ALL SELECT 'sample_rate', CAST(a.sample_rate AS STRING), CAST(b.sample_rate AS STRING) FROM a CROSS JOIN b
    UNION ALL SELECT 'segment_seconds', CAST(a.segment_seconds AS STRING), CAST(b.segment_seconds AS STRING) FROM a CROSS JOIN b
    UNION ALL SELECT 'dataset', a.dataset_name, b.dataset_name FROM a CROSS JOIN b
    UNION ALL SELECT 'dataset_fingerprint', a.dataset_fingerprint, b.dataset_fingerprint FROM a CROSS JOIN b
    UNION ALL SELECT 'featurebeam_version', a.featurebeam_version, b.featurebeam_version FROM a CROSS JOIN b
    UNION ALL SELECT 'git_commit', a.git_commit, b.git_commit FROM a CROSS JOIN b
  ),
  extractors_a AS (SELECT e.name, CONCAT(e.name, '@', e.version, ' ', e.config) AS spec FROM a, UNNEST(a.extractors) AS e),
  extractors_b AS (SELECT e.name, CONCAT(e.name, '@', e.version, ' ', e.config) AS spec FROM b, UNNEST(b.extractors) AS e)
SELECT setting, run_a, run_b
FROM (
  SELECT setting, run_a, run_b FROM settings
  UNION ALL
  SELECT CONCAT('extractor ', COALESCE(x.name, y.name)) AS setting, x.spec AS run_a, y.spec AS run_b
  FROM extractors_a AS x FULL OUTER JOIN extractors_b AS y ON x.name = y.name
)
WHERE run_a IS DISTINCT FROM run_b
ORDER BY setting
