-- The images a detector's ground truth covers (with or without boxes), numbered img = 0..n-1 by
-- image id, with the factors that scale YOLO's normalised boxes to pixels (scale_w, scale_h: the
-- image's stored width and height from images.parquet; NULL for COCO, already in pixels). An
-- image with normalised boxes and no known size is left out.
SELECT
    (row_number() OVER (ORDER BY l.image_id) - 1)::BIGINT AS img,
    l.image_id,
    CASE WHEN l.width IS NULL THEN i.width END  AS scale_w,
    CASE WHEN l.width IS NULL THEN i.height END AS scale_h
FROM _dmx_labels_images l LEFT JOIN images i USING (image_id)
WHERE l.width IS NOT NULL OR (i.width > 0 AND i.height > 0)
