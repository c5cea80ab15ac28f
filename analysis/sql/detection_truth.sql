-- A detector's ground truth in image pixels, one row per box, with the image's position in
-- detection_truth_images (img, 0-based, by image id). labels_boxes.parquet holds COCO's boxes in
-- pixels and YOLO's normalised to 0-1 (its labels_images.parquet width/height null): those are
-- scaled here by the image's stored size in images.parquet. An image whose size is unknown (it
-- could not be read) is left out of detection_truth_images, so out of every mAP.
SELECT
    t.img,
    b.image_id,
    b.x1 * coalesce(t.scale_w, 1) AS x1,
    b.y1 * coalesce(t.scale_h, 1) AS y1,
    b.x2 * coalesce(t.scale_w, 1) AS x2,
    b.y2 * coalesce(t.scale_h, 1) AS y2,
    b.label_index,
    b.iscrowd,
    b.area * coalesce(t.scale_w, 1) * coalesce(t.scale_h, 1) AS area
FROM _dmx_labels_boxes b JOIN detection_truth_images t USING (image_id)
ORDER BY t.img, b.x1, b.y1
