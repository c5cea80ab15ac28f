-- dmx check: the reuse guard's findings per cell: how far a sampled image's output moved when
-- re-inferred in another batch composition or size (rows' batch_* columns; null = not sampled).
-- Per cell and effective precision (each part judged by its own limit). Units: max abs in
-- output units (logits), rel L2 a ratio.
SELECT cell_id, precision_effective, count(batch_rel_l2) AS n, max(batch_rel_l2) AS rel_l2,
       max(batch_max_abs) AS max_abs, arg_max(image_id, {'v': batch_rel_l2, 'i': image_id}) AS image_id
FROM rows
WHERE status = 'ok' AND batch_rel_l2 IS NOT NULL
GROUP BY cell_id, precision_effective
ORDER BY cell_id, precision_effective
