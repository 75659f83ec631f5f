-- Every run, newest first: dataset, when, counts, audio and extractors.
SELECT
  run_id,
  dataset.name AS dataset,
  started,
  ROUND(wall_seconds, 1) AS wall_seconds,
  records,
  ok,
  failed,
  ROUND(audio_seconds / 3600, 4) AS audio_hours,
  ARRAY_TO_STRING(ARRAY(SELECT CONCAT(e.name, '@', e.version) FROM UNNEST(extractors) AS e), ', ') AS extractors,
  config_hash
FROM runs
ORDER BY started DESC, run_id
