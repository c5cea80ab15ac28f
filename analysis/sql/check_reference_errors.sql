-- dmx check: images the reference cell did not handle (status other than 'ok'): no other cell can
-- be compared on them. Columns: n (images), stage and error (an example), image_id (an example).
SELECT count(DISTINCT image_id) AS n, any_value(error_stage) AS stage, any_value(error) AS example,
       min(image_id) AS image_id
FROM rows
WHERE is_reference AND status <> 'ok'
