-- Cells by status (ok / skipped / error), for the report's header.
SELECT status, count(*) AS n FROM cells GROUP BY status ORDER BY n DESC
