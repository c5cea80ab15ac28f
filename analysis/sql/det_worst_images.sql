-- Per cell, the images whose final detections differ most from the reference's: most boxes
-- missed + extra + class-flipped, then the lowest mean IoU of the matched boxes.
SELECT
    r.cell_id, r.image_id, r.det_n_ref, r.det_n, r.det_matched, r.det_missed, r.det_extra,
    r.det_mean_iou, r.det_score_delta_max, r.det_class_flips, r.det_rank_tau
FROM rows r
WHERE r.status = 'ok' AND r.det_same = false AND list_contains($cells, r.cell_id)
QUALIFY row_number() OVER (
    PARTITION BY r.cell_id
    ORDER BY r.det_missed + r.det_extra + r.det_class_flips DESC, r.det_mean_iou ASC NULLS FIRST, r.image_id
) <= $per_cell
ORDER BY r.cell_id, r.det_missed + r.det_extra + r.det_class_flips DESC, r.det_mean_iou ASC NULLS FIRST
