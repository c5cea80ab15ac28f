-- Per-cell summary of divergence against the reference cell (rows with status 'ok' and a
-- measured divergence). Units: cosine distance 1 - cos (0 = identical direction), max abs in
-- output units (logits), input px in 0-255.
SELECT
    cell_id,
    count(*) FILTER (WHERE status = 'ok')                    AS n_ok,
    count(*) FILTER (WHERE status = 'error')                 AS n_error,
    count(*) FILTER (WHERE status = 'skipped')               AS n_skipped,
    count(out_cosine)                                        AS n,
    avg(cos_dist)                                      AS cos_dist_mean,
    stddev_samp(cos_dist)                              AS cos_dist_sd,
    quantile_cont(cos_dist, 0.5)                       AS cos_dist_p50,
    quantile_cont(cos_dist, 0.95)                      AS cos_dist_p95,
    max(cos_dist)                                      AS cos_dist_max,
    avg(out_max_abs)                                         AS max_abs_mean,
    stddev_samp(out_max_abs)                                 AS max_abs_sd,
    quantile_cont(out_max_abs, 0.5)                          AS max_abs_p50,
    quantile_cont(out_max_abs, 0.95)                         AS max_abs_p95,
    max(out_max_abs)                                         AS max_abs_max,
    max(out_rel_l2)                                          AS rel_l2_max,
    count(top1_agree)                                        AS n_top1,
    sum(CASE WHEN top1_agree THEN 0 ELSE 1 END) FILTER (WHERE top1_agree IS NOT NULL) AS top1_flips,
    avg(px_mean_abs)                                         AS px_mean_abs,
    avg(px_equal::DOUBLE)                                    AS px_equal_frac,
    sum(CASE WHEN shape_match THEN 0 ELSE 1 END) FILTER (WHERE shape_match IS NOT NULL) AS shape_mismatches,
    count(out_cosine) FILTER (WHERE px_equal)                AS n_same_input,
    avg(cos_dist) FILTER (WHERE px_equal)              AS cos_dist_same_input,
    count(out_cosine) FILTER (WHERE NOT px_equal)            AS n_diff_input,
    avg(cos_dist) FILTER (WHERE NOT px_equal)          AS cos_dist_diff_input,
    any_value(precision_effective)                           AS precision_effective,
    avg(latency_ms)                                          AS latency_ms
FROM (SELECT *, CASE WHEN out_cosine IS NULL THEN NULL ELSE greatest(1 - out_cosine, 0.0) END AS cos_dist
      FROM rows)
GROUP BY cell_id
