-- dmx check: per cell, rows that failed (status 'error') on images the reference cell handled.
SELECT r.cell_id, count(*) AS n, any_value(r.error_stage) AS stage,
       any_value(r.image_id) AS image_id, any_value(r.error) AS example
FROM rows r JOIN rows ref ON ref.is_reference AND ref.image_id = r.image_id
WHERE r.status = 'error' AND NOT r.is_reference AND ref.status = 'ok'
GROUP BY r.cell_id
