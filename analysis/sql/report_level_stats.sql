-- Per level of one axis, the box the distribution panel draws, over ``level_box``: the ok
-- non-reference rows with a finite value (x: cosine distance 1 - cos, or max abs in logits) -
-- all of them, or above BOX_ROWS a uniform sample by row hash (the counts come from every
-- row, see report.level_stats). Values at or below $zero are drawn at $floor. Box: quartiles
-- (linear interpolation, as numpy's percentile); whiskers at the most extreme values within
-- 1.5 IQR of the box.
WITH v AS (
    SELECT level, CASE WHEN x > $zero THEN x ELSE $floor END AS x FROM level_box
), q AS (
    SELECT level, quantile_cont(x, 0.25) AS q1, quantile_cont(x, 0.5) AS med,
           quantile_cont(x, 0.75) AS q3
    FROM v GROUP BY level
)
SELECT q.level, q.q1, q.med, q.q3,
       min(v.x) FILTER (v.x >= q.q1 - 1.5 * (q.q3 - q.q1)) AS whislo,
       max(v.x) FILTER (v.x <= q.q3 + 1.5 * (q.q3 - q.q1)) AS whishi
FROM q JOIN v USING (level)
GROUP BY ALL
