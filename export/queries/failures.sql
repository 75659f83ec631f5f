-- Dead letters of every run grouped by stage and reason, most frequent first, with one example message.
SELECT
  run_id,
  stage,
  reason,
  COUNT(*) AS items,
  MIN(uri) AS example_uri,
  MIN(message) AS example_message
FROM errors
GROUP BY run_id, stage, reason
ORDER BY items DESC, run_id, stage, reason
