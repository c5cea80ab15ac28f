-- Per non-reference cell, paired with the reference cell image by image: over the images both
-- judged (correct_* not null on both sides), n, how many the reference got right, and the
-- discordant images right->wrong (reference right, cell wrong) and wrong->right; top-1 and
-- top-5. Four counts per cell are all the paired bootstrap and McNemar's test need
-- (analysis/paired.py: paired_from_counts). n_unpaired: labelled images the reference judged
-- that this cell did not (its error rows) - left out of the pair, and reported.
WITH ref AS (
    SELECT image_id, correct_top1 AS r1, correct_top5 AS r5
    FROM rows WHERE is_reference AND correct_top1 IS NOT NULL
), cell AS (
    SELECT cell_id, image_id, correct_top1 AS c1, correct_top5 AS c5
    FROM rows WHERE NOT is_reference AND label IS NOT NULL
)
SELECT
    cell.cell_id,
    count(*) FILTER (WHERE c1 IS NOT NULL)                     AS n,
    count(*) FILTER (WHERE c1 IS NOT NULL AND r1)              AS ref_right,
    count(*) FILTER (WHERE r1 AND NOT c1)                      AS right_to_wrong,
    count(*) FILTER (WHERE NOT r1 AND c1)                      AS wrong_to_right,
    count(*) FILTER (WHERE c5 IS NOT NULL AND r5 IS NOT NULL)  AS n_top5,
    count(*) FILTER (WHERE c5 IS NOT NULL AND r5)              AS ref_right_top5,
    count(*) FILTER (WHERE r5 AND NOT c5)                      AS right_to_wrong_top5,
    count(*) FILTER (WHERE NOT r5 AND c5)                      AS wrong_to_right_top5,
    count(*) FILTER (WHERE c1 IS NULL)                         AS n_unpaired
FROM cell JOIN ref USING (image_id)
GROUP BY cell.cell_id
ORDER BY cell.cell_id
