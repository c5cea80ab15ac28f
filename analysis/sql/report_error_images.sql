-- The images with the most error rows, with the failing stage and one message.
SELECT image_id, any_value(error_stage) AS stage, any_value(error) AS error, count(*) AS n
FROM rows WHERE status = 'error'
GROUP BY image_id ORDER BY n DESC, image_id LIMIT 10
