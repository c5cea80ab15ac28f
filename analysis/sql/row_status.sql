-- Row counts by status and failing stage.
SELECT status, error_stage, count(*) AS n, count(DISTINCT image_id) AS images,
       any_value(error) AS example
FROM rows GROUP BY ALL ORDER BY n DESC
