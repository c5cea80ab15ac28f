-- Per cell, which of the model's outputs moved most (out_worst: the largest rel L2 of the
-- compared outputs) on how many images, and each output's median rel L2 (models with several
-- outputs; a one-output model's rows have outputs = NULL and give no row).
SELECT cell_id, o.name AS output, count(*) AS n,
       count(*) FILTER (WHERE out_worst = o.name AND out_rel_l2 > 0) AS n_worst,
       quantile_cont(o.rel_l2, 0.5) AS rel_l2_p50, max(o.max_abs) AS max_abs_max
FROM rows, unnest(outputs) AS t(o)
WHERE status = 'ok' AND NOT is_reference AND outputs IS NOT NULL AND list_contains($cells, cell_id)
GROUP BY ALL
ORDER BY cell_id, output
