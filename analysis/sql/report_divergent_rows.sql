-- The rows of the given cells that diverge most from the reference (cosine distance, then max
-- abs), with the reference cell's prediction for the same image and the image file's path and
-- properties. Units: cosine distance 1 - cos, max abs in logits, px in 0-255.
-- The top rows are chosen first and only they are joined to the reference's rows (a row has
-- out_cosine only where the reference's output exists), so the cost is one scan of the cells.
WITH top AS (
    SELECT * FROM rows r
    WHERE r.status = 'ok' AND r.out_cosine IS NOT NULL AND list_contains($cells, r.cell_id)
    ORDER BY 1 - r.out_cosine DESC, r.out_max_abs DESC, r.image_id, r.cell_id
    LIMIT $limit
)
SELECT r.cell_id, r.image_id, i.path,
       1 - r.out_cosine AS cos_dist, r.out_max_abs AS max_abs, r.out_rel_l2 AS rel_l2,
       r.px_equal, r.px_max_abs, r.px_mean_abs, r.px_frac_diff, r.shape_match,
       r.decoded_w, r.decoded_h, r.precision_effective,
       r.top1, r.top5, r.top5_prob, ref.top1 AS ref_top1, ref.top5 AS ref_top5,
       ref.top5_prob AS ref_top5_prob, ref.decoded_w AS ref_decoded_w, ref.decoded_h AS ref_decoded_h,
       i.width, i.height, i.subsampling, i.progressive, i.exif_orientation, i.color_mode
FROM top r
JOIN rows ref ON ref.is_reference AND ref.image_id = r.image_id AND ref.status = 'ok'
LEFT JOIN images i ON i.image_id = r.image_id
ORDER BY cos_dist DESC, max_abs DESC, r.image_id, r.cell_id
