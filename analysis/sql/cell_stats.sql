-- Per cell and effective precision (a cell whose rows ran at two precisions, say bf16 on the
-- nodes with AMX and fp32 elsewhere, is two parts), divergence against the reference cell.
-- Units: cosine distance 1 - cos (0 = identical direction), max abs in output units (logits),
-- input px in 0-255. Rows whose output is NaN or Inf are counted (n_nonfinite) and left out of
-- the statistics. n_divergent: rows whose output moved (cosine distance > $cos_eps) or is not
-- finite. NaN is tested with isfinite() inside FILTER/CASE, never in WHERE: Parquet min/max
-- statistics leave NaN out and a pushed-down filter trusts them.
WITH r AS (
    SELECT *, out_cosine IS NOT NULL AND (NOT isfinite(out_cosine)
                                          OR coalesce(NOT isfinite(out_max_abs), false)) AS nonfinite
    FROM rows
    WHERE list_contains($cells, cell_id)
), f AS (
    SELECT *, CASE WHEN out_cosine IS NULL OR nonfinite THEN NULL
                   ELSE greatest(1 - out_cosine, 0.0) END AS cos_dist,
              CASE WHEN nonfinite THEN NULL ELSE out_max_abs END AS max_abs,
              CASE WHEN nonfinite THEN NULL ELSE out_rel_l2 END AS rel_l2
    FROM r
)
SELECT
    cell_id,
    precision_effective,
    count(*) FILTER (WHERE status = 'ok')                    AS n_ok,
    count(*) FILTER (WHERE status = 'error')                 AS n_error,
    count(*) FILTER (WHERE status = 'skipped')               AS n_skipped,
    count(out_cosine)                                        AS n,
    count(*) FILTER (WHERE nonfinite)                        AS n_nonfinite,
    min(image_id) FILTER (WHERE nonfinite)                   AS nonfinite_image,
    count(*) FILTER (WHERE nonfinite OR cos_dist > $cos_eps) AS n_divergent,
    avg(cos_dist)                                            AS cos_dist_mean,
    quantile_cont(cos_dist, 0.5)                             AS cos_dist_p50,
    quantile_cont(cos_dist, 0.95)                            AS cos_dist_p95,
    max(cos_dist)                                            AS cos_dist_max,
    avg(max_abs)                                             AS max_abs_mean,
    quantile_cont(max_abs, 0.95)                             AS max_abs_p95,
    max(max_abs)                                             AS max_abs_max,
    max(rel_l2)                                              AS rel_l2_max,
    count(top1_agree)                                        AS n_top1,
    sum(CASE WHEN top1_agree THEN 0 ELSE 1 END) FILTER (WHERE top1_agree IS NOT NULL) AS top1_flips,
    avg(px_mean_abs)                                         AS px_mean_abs,
    avg(px_equal::DOUBLE)                                    AS px_equal_frac,
    sum(CASE WHEN shape_match THEN 0 ELSE 1 END) FILTER (WHERE shape_match IS NOT NULL) AS shape_mismatches,
    count(cos_dist) FILTER (WHERE px_equal)                  AS n_same_input,
    avg(cos_dist) FILTER (WHERE px_equal)                    AS cos_dist_same_input,
    count(cos_dist) FILTER (WHERE NOT px_equal)              AS n_diff_input,
    avg(cos_dist) FILTER (WHERE NOT px_equal)                AS cos_dist_diff_input,
    avg(latency_ms)                                          AS latency_ms
FROM f
GROUP BY cell_id, precision_effective
