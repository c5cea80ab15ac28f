-- Every cell's kept boxes (det_boxes, decoded-image pixels) on the images the ground truth
-- covers, one row per box, with the image's img from detection_truth_images. Only rows that ran
-- (status ok): an error row has no boxes, and is not judged (detection_cell_images).
SELECT r.cell_id, t.img, b.x1, b.y1, b.x2, b.y2, b.score, b."class" AS cls
FROM (SELECT cell_id, image_id, unnest(det_boxes) AS b FROM rows
      WHERE status = 'ok' AND det_boxes IS NOT NULL) r
JOIN detection_truth_images t USING (image_id)
ORDER BY r.cell_id, t.img, b.score DESC
