-- Per cell: accuracy against the ground truth (dataset.labels). n_labelled: rows of an image
-- with a label; n: those judged (the cell produced an output: correct_top1 not null; error and
-- skipped rows are labelled but not judged); right counts for top-1 and top-5. Accuracies in
-- points (0-100). Cells without a labelled row give n_labelled = 0 and NULL accuracies.
SELECT
    cell_id,
    bool_or(is_reference)                                      AS is_reference,
    count(label)                                               AS n_labelled,
    count(correct_top1)                                        AS n,
    count(*) FILTER (WHERE correct_top1)                       AS top1_right,
    count(correct_top5)                                        AS n_top5,
    count(*) FILTER (WHERE correct_top5)                       AS top5_right,
    100.0 * count(*) FILTER (WHERE correct_top1) / nullif(count(correct_top1), 0) AS top1,
    100.0 * count(*) FILTER (WHERE correct_top5) / nullif(count(correct_top5), 0) AS top5
FROM rows
GROUP BY cell_id
ORDER BY cell_id
