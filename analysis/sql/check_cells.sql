-- dmx check: per cell and effective precision (a cell whose rows ran at two precisions is
-- judged as two parts), the worst value of each judged metric and how many rows break its limit.
-- Joins the registered table `limits` (cell_id, precision_effective - NULL for rows that name
-- none -, max_abs, max_rel_l2, min_cosine; NULL = not checked). $same_input = true keeps only rows whose model input equals the reference's.
-- NaN counts as breaking every limit. The image named is the worst one's; of equal values the
-- last (max) or first (min) image id, so that any subset of the rows names the same one. Units: max abs in output units (logits), rel L2 a ratio.
-- NaN is tested as isnan(nullif(x, 1e308)): Parquet min/max statistics leave NaN out and DuckDB
-- trusts them, folding isnan(x) (and x > c) to false on a column whose NaNs it cannot see (files
-- written by other tools carry such statistics); nullif hides the statistics at the cost of a
-- compare (x::VARCHAR::DOUBLE did too, by formatting every value: 64 M rows 10 s -> 1.5 s).
WITH judged AS (
    SELECT r.cell_id, r.precision_effective, r.image_id, r.out_max_abs, r.out_rel_l2, r.out_cosine, r.top1_agree,
           isnan(nullif(r.out_max_abs, 1e308)) AS max_abs_nan,
           isnan(nullif(r.out_rel_l2, 1e308))  AS rel_l2_nan,
           isnan(nullif(r.out_cosine, 1e308))  AS cosine_nan,
           l.max_abs AS lim_max_abs, l.max_rel_l2 AS lim_rel_l2, l.min_cosine AS lim_cosine
    FROM rows r JOIN limits l
      ON l.cell_id = r.cell_id AND l.precision_effective IS NOT DISTINCT FROM r.precision_effective
    WHERE r.status = 'ok' AND NOT r.is_reference AND (NOT $same_input OR r.px_equal)
)
SELECT
    cell_id,
    precision_effective,
    count(*)                                                                 AS n,
    max(CASE WHEN max_abs_nan THEN 'NaN'::DOUBLE ELSE out_max_abs END)      AS max_abs,
    arg_max(image_id, {'v': CASE WHEN max_abs_nan THEN 'Infinity'::DOUBLE ELSE out_max_abs END, 'i': image_id})
        FILTER (WHERE out_max_abs IS NOT NULL)                              AS max_abs_image,
    count(*) FILTER (WHERE out_max_abs > lim_max_abs OR (max_abs_nan AND lim_max_abs IS NOT NULL)) AS max_abs_bad,
    max(CASE WHEN rel_l2_nan THEN 'NaN'::DOUBLE ELSE out_rel_l2 END)        AS rel_l2,
    arg_max(image_id, {'v': CASE WHEN rel_l2_nan THEN 'Infinity'::DOUBLE ELSE out_rel_l2 END, 'i': image_id})
        FILTER (WHERE out_rel_l2 IS NOT NULL)                               AS rel_l2_image,
    count(*) FILTER (WHERE out_rel_l2 > lim_rel_l2 OR (rel_l2_nan AND lim_rel_l2 IS NOT NULL)) AS rel_l2_bad,
    min(CASE WHEN cosine_nan THEN -2.0 ELSE out_cosine END)                  AS cosine,
    arg_min(image_id, {'v': CASE WHEN cosine_nan THEN -2.0 ELSE out_cosine END, 'i': image_id})
        FILTER (WHERE out_cosine IS NOT NULL)                               AS cosine_image,
    count(*) FILTER (WHERE out_cosine < lim_cosine OR (cosine_nan AND lim_cosine IS NOT NULL)) AS cosine_bad,
    count(top1_agree)                                                        AS n_top1,
    count(*) FILTER (WHERE NOT top1_agree)                                   AS top1_flips,
    arg_min(image_id, {'v': top1_agree::INTEGER, 'i': image_id})
        FILTER (WHERE top1_agree IS NOT NULL)                               AS top1_image
FROM judged
GROUP BY cell_id, precision_effective
