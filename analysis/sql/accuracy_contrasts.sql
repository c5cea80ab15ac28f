-- The accuracy_contrasts view: each non-reference cell against the reference cell, paired over
-- the images both judged (sql/accuracy_pairs.sql gives the counts). Points (0-100). The 95%
-- paired bootstrap interval and McNemar's exact p are functions of the four counts alone
-- (analysis/paired.py: paired_from_counts), called once per cell: dmx_ci_low/high and
-- dmx_mcnemar_p, registered by analysis/accuracy.py.
SELECT
    c.label                                                       AS cell,
    p.cell_id,
    p.n,
    100.0 * p.ref_right / nullif(p.n, 0)                          AS accuracy_ref,
    100.0 * (p.ref_right - p.right_to_wrong + p.wrong_to_right) / nullif(p.n, 0) AS accuracy,
    100.0 * (p.wrong_to_right - p.right_to_wrong) / nullif(p.n, 0) AS delta,
    dmx_ci_low(p.n, p.right_to_wrong, p.wrong_to_right)           AS ci_low,
    dmx_ci_high(p.n, p.right_to_wrong, p.wrong_to_right)          AS ci_high,
    p.right_to_wrong,
    p.wrong_to_right,
    dmx_mcnemar_p(p.right_to_wrong, p.wrong_to_right)             AS p_value,
    p.n_unpaired,
    p.n_top5,
    100.0 * p.ref_right_top5 / nullif(p.n_top5, 0)                AS accuracy_top5_ref,
    100.0 * (p.ref_right_top5 - p.right_to_wrong_top5 + p.wrong_to_right_top5)
          / nullif(p.n_top5, 0)                                   AS accuracy_top5,
    100.0 * (p.wrong_to_right_top5 - p.right_to_wrong_top5) / nullif(p.n_top5, 0) AS delta_top5,
    dmx_ci_low(p.n_top5, p.right_to_wrong_top5, p.wrong_to_right_top5)  AS ci_low_top5,
    dmx_ci_high(p.n_top5, p.right_to_wrong_top5, p.wrong_to_right_top5) AS ci_high_top5,
    p.right_to_wrong_top5,
    p.wrong_to_right_top5,
    dmx_mcnemar_p(p.right_to_wrong_top5, p.wrong_to_right_top5)   AS p_value_top5
FROM accuracy_pairs_counts p JOIN cells c USING (cell_id)
ORDER BY delta, p.cell_id
