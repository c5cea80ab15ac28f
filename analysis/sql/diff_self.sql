-- `dmx diff` of each cell of one run against the same rows: what diff_cells.sql says when run B's
-- rows of a cell equal run A's (B = A), computed without the join, and the cell's digest over
-- every column diff_cells.sql compares (n, digest: xor of the rows' hashes; the rows of a cell
-- are unique per image). Kept in the run's summary: two runs whose cell has the same n and digest
-- have the same rows there, and diff takes this row instead of joining them. Deltas are computed
-- as diff_cells.sql does (|x - x|: NaN stays NaN, as a NaN on both sides does in the join).
WITH r AS (
    SELECT r.cell_id, r.image_id, c.label, r.status, r.out_max_abs, 1 - r.out_cosine AS cos_dist,
           r.top1, r.top1_agree, r.top5_prob[1] AS top1_prob, r.threads_used, r.out_digest
    FROM rows r JOIN cells c USING (cell_id)
)
SELECT
    cell_id,
    any_value(label)                                                        AS label,
    count(*)                                                                AS rows_a,
    count(*)                                                                AS rows_b,
    0::BIGINT                                                               AS only_a,
    0::BIGINT                                                               AS only_b,
    0::BIGINT                                                               AS status_changed,
    count(out_max_abs)                                                      AS compared,
    avg(abs(out_max_abs - out_max_abs))                                     AS max_abs_delta_mean,
    max(abs(out_max_abs - out_max_abs))                                     AS max_abs_delta_max,
    arg_max(image_id, {'v': abs(out_max_abs - out_max_abs), 'i': image_id})
        FILTER (WHERE out_max_abs IS NOT NULL)                              AS max_abs_image,
    avg(abs(cos_dist - cos_dist))                                           AS cos_delta_mean,
    max(abs(cos_dist - cos_dist))                                           AS cos_delta_max,
    max(abs(top1_prob - top1_prob))                                         AS top1_prob_delta_max,
    avg(top1_agree::DOUBLE) FILTER (WHERE top1_agree IS NOT NULL)           AS top1_agree_a,
    avg(top1_agree::DOUBLE) FILTER (WHERE top1_agree IS NOT NULL)           AS top1_agree_b,
    0::BIGINT                                                               AS top1_changed,
    NULL::VARCHAR                                                           AS top1_image,
    count(out_digest)                                                       AS outputs_compared,
    0::BIGINT                                                               AS outputs_changed,
    NULL::VARCHAR                                                           AS output_image,
    max(threads_used)                                                       AS threads_a,
    max(threads_used)                                                       AS threads_b,
    count(*)                                                                AS n,
    -- hashed twice: DuckDB combines a hash's last argument by xor, so outputs swapped between
    -- two images (or changed in equal pairs) cancelled out of the xor over rows
    bit_xor(hash(hash(image_id, status, out_max_abs, cos_dist, top1, top1_agree, top1_prob,
                      threads_used, out_digest)))                           AS digest
FROM r
GROUP BY cell_id
ORDER BY cell_id
