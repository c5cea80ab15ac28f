-- The rows of the given cells that diverge most from the reference (cosine distance, then max
-- abs), with the reference cell's prediction for the same image and the image file's path and
-- properties. Units: cosine distance 1 - cos, max abs in logits, px in 0-255.
SELECT r.cell_id, r.image_id, i.path,
       1 - r.out_cosine AS cos_dist, r.out_max_abs AS max_abs, r.out_rel_l2 AS rel_l2,
       r.px_equal, r.px_max_abs, r.px_mean_abs, r.px_frac_diff, r.shape_match,
       r.decoded_w, r.decoded_h, r.precision_effective,
       r.top1, r.top5, r.top5_prob, ref.top1 AS ref_top1, ref.top5 AS ref_top5,
       ref.top5_prob AS ref_top5_prob, ref.decoded_w AS ref_decoded_w, ref.decoded_h AS ref_decoded_h,
       i.width, i.height, i.subsampling, i.progressive, i.exif_orientation, i.color_mode
FROM rows r
JOIN rows ref ON ref.is_reference AND ref.image_id = r.image_id AND ref.status = 'ok'
LEFT JOIN images i ON i.image_id = r.image_id
WHERE r.status = 'ok' AND r.out_cosine IS NOT NULL AND list_contains($cells, r.cell_id)
ORDER BY cos_dist DESC, max_abs DESC, r.image_id, r.cell_id
LIMIT $limit
