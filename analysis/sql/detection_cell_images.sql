-- The images with ground truth each cell judged: it ran on them (status ok, its boxes kept,
-- none or some). A cell's mAP is over these; its change against the reference over the images
-- both judged.
SELECT r.cell_id, bool_or(r.is_reference) AS is_reference, list(t.img ORDER BY t.img) AS imgs
FROM rows r JOIN detection_truth_images t USING (image_id)
WHERE r.status = 'ok' AND r.det_boxes IS NOT NULL
GROUP BY r.cell_id
ORDER BY r.cell_id
