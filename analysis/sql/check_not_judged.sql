-- dmx check: per non-reference cell, its 'ok' rows and those of them that carry no divergence
-- metrics (nothing was measured, so nothing can be judged), with how many of the latter are
-- images the reference cell failed on. Columns: cell_id, n_ok, n (rows not judged),
-- n_reference_failed, image_id (an example not-judged image). Only the rows not judged are
-- joined to the reference's (joining every row: 64 M rows 12.8 s).
WITH counts AS (
    SELECT cell_id, count(*) AS n_ok,
           count(*) FILTER (WHERE out_max_abs IS NULL AND out_cosine IS NULL) AS n,
           min(image_id) FILTER (WHERE out_max_abs IS NULL AND out_cosine IS NULL) AS image_id
    FROM rows
    WHERE status = 'ok' AND NOT is_reference
    GROUP BY cell_id
), unmeasured AS (
    SELECT r.cell_id, count(*) FILTER (WHERE ref.status IS DISTINCT FROM 'ok') AS n_reference_failed
    FROM rows r LEFT JOIN (SELECT image_id, status FROM rows WHERE is_reference) ref USING (image_id)
    WHERE r.status = 'ok' AND NOT r.is_reference AND r.out_max_abs IS NULL AND r.out_cosine IS NULL
    GROUP BY r.cell_id
)
SELECT c.cell_id, c.n_ok, c.n, coalesce(u.n_reference_failed, 0) AS n_reference_failed, c.image_id
FROM counts c LEFT JOIN unmeasured u USING (cell_id)
