-- The images that diverge most in the given cells, with the file properties that explain why.
SELECT
    r.cell_id, r.image_id,
    CASE WHEN r.out_cosine IS NULL THEN NULL ELSE greatest(1 - r.out_cosine, 0.0) END AS cos_dist, r.out_max_abs AS max_abs, r.top1, r.top1_ref, r.top1_agree,
    r.shape_match, r.px_mean_abs, r.decoded_w, r.decoded_h,
    i.width, i.height, i.subsampling, i.progressive, i.exif_orientation, i.color_mode
FROM rows r LEFT JOIN images i USING (image_id)
WHERE r.status = 'ok' AND r.out_cosine IS NOT NULL AND list_contains($cells, r.cell_id)
QUALIFY row_number() OVER (PARTITION BY r.cell_id ORDER BY 1 - r.out_cosine DESC, r.image_id) <= $per_cell
ORDER BY r.cell_id, cos_dist DESC
