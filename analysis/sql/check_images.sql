-- dmx check: how many images the run holds. Every image has a reference row (an error is a row
-- too), so one cell's rows count them.
SELECT count(DISTINCT image_id) AS n FROM rows WHERE is_reference
