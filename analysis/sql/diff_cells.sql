-- `dmx diff`: per cell, how run B's rows moved against run A's for the same (cell_id, image_id)
-- (cell ids hash the factors, so they match across runs of one spec). Tables a_rows and b_rows
-- come from diff_rows.sql. Deltas are |B - A|: max abs in logits, cosine distance (1 - cos),
-- top-1 probability in 0-1. NaN on either side makes the delta NaN. outputs_changed: images whose
-- output itself differs bit for bit (out_digest) - the only measure that sees a change moving
-- the reference cell too, for every task. Images named: the largest delta's (of equal ones the
-- last image id), the first whose top-1 or output changed.
WITH j AS (
    SELECT coalesce(a.cell_id, b.cell_id) AS cell_id, coalesce(a.image_id, b.image_id) AS image_id,
           coalesce(a.label, b.label) AS label,
           a.cell_id IS NOT NULL AS in_a, b.cell_id IS NOT NULL AS in_b,
           a.status AS status_a, b.status AS status_b,
           abs(b.out_max_abs - a.out_max_abs) AS d_max_abs,
           abs(b.cos_dist - a.cos_dist) AS d_cos,
           abs(b.top1_prob - a.top1_prob) AS d_prob,
           a.top1 AS top1_a, b.top1 AS top1_b, a.top1_agree AS agree_a, b.top1_agree AS agree_b,
           a.threads_used AS threads_a, b.threads_used AS threads_b,
           a.out_digest AS digest_a, b.out_digest AS digest_b
    FROM a_rows a FULL OUTER JOIN b_rows b ON a.cell_id = b.cell_id AND a.image_id = b.image_id
)
SELECT
    cell_id,
    any_value(label)                                                        AS label,
    count(*) FILTER (WHERE in_a)                                            AS rows_a,
    count(*) FILTER (WHERE in_b)                                            AS rows_b,
    count(*) FILTER (WHERE in_a AND NOT in_b)                               AS only_a,
    count(*) FILTER (WHERE in_b AND NOT in_a)                               AS only_b,
    count(*) FILTER (WHERE in_a AND in_b AND status_a <> status_b)          AS status_changed,
    count(d_max_abs)                                                        AS compared,
    avg(d_max_abs)                                                          AS max_abs_delta_mean,
    max(d_max_abs)                                                          AS max_abs_delta_max,
    arg_max(image_id, {'v': d_max_abs, 'i': image_id}) FILTER (WHERE d_max_abs IS NOT NULL) AS max_abs_image,
    avg(d_cos)                                                              AS cos_delta_mean,
    max(d_cos)                                                              AS cos_delta_max,
    max(d_prob)                                                             AS top1_prob_delta_max,
    avg(agree_a::DOUBLE) FILTER (WHERE agree_a IS NOT NULL AND agree_b IS NOT NULL) AS top1_agree_a,
    avg(agree_b::DOUBLE) FILTER (WHERE agree_a IS NOT NULL AND agree_b IS NOT NULL) AS top1_agree_b,
    count(*) FILTER (WHERE status_a = 'ok' AND status_b = 'ok' AND top1_a <> top1_b) AS top1_changed,
    min(image_id) FILTER (WHERE status_a = 'ok' AND status_b = 'ok' AND top1_a <> top1_b) AS top1_image,
    count(*) FILTER (WHERE digest_a IS NOT NULL AND digest_b IS NOT NULL)   AS outputs_compared,
    count(*) FILTER (WHERE digest_a <> digest_b)                            AS outputs_changed,
    min(image_id) FILTER (WHERE digest_a <> digest_b)                       AS output_image,
    max(threads_a)                                                          AS threads_a,
    max(threads_b)                                                          AS threads_b
FROM j
GROUP BY cell_id
ORDER BY cell_id
