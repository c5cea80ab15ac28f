-- Per-cell detection agreement with the reference cell (detector runs only). Candidates: the
-- pre-NMS score order (Kendall tau-b over the top-k candidates, 1 = same order; top-k overlap
-- 0-1). Final boxes: post-NMS counts, greedy matches at the run's match IoU, mean IoU (0-1),
-- score deltas (0-1), class flips; det_same = the final set is the same at the stated tolerance.
SELECT
    cell_id,
    count(*)                                                 AS n,
    avg(det_rank_tau)                                        AS tau_mean,
    quantile_cont(det_rank_tau, 0.5)                         AS tau_p50,
    min(det_rank_tau)                                        AS tau_min,
    avg(det_topk_overlap)                                    AS topk_mean,
    count(*) FILTER (WHERE det_rank_tau < 1)                 AS n_reordered,
    count(*) FILTER (WHERE NOT det_same)                     AS n_changed,
    sum(det_n_ref)                                           AS boxes_ref,
    sum(det_n)                                               AS boxes,
    sum(det_matched)                                         AS matched,
    sum(det_missed)                                          AS missed,
    sum(det_extra)                                           AS extra,
    avg(det_mean_iou)                                        AS iou_mean,
    min(det_mean_iou)                                        AS iou_min,
    max(det_score_delta_max)                                 AS score_delta_max,
    sum(det_class_flips)                                     AS class_flips
FROM rows
WHERE status = 'ok' AND det_same IS NOT NULL AND list_contains($cells, cell_id)
GROUP BY cell_id
