-- dmx check: per non-reference cell, its 'ok' rows and those of them that carry no divergence
-- metrics (nothing was measured, so nothing can be judged), with how many of the latter are
-- images the reference cell failed on. Columns: cell_id, n_ok, n (rows not judged),
-- n_reference_failed, image_id (an example not-judged image).
SELECT r.cell_id, count(*) AS n_ok,
       count(*) FILTER (WHERE r.out_max_abs IS NULL AND r.out_cosine IS NULL) AS n,
       count(*) FILTER (WHERE r.out_max_abs IS NULL AND r.out_cosine IS NULL
                        AND ref.status IS DISTINCT FROM 'ok') AS n_reference_failed,
       min(r.image_id) FILTER (WHERE r.out_max_abs IS NULL AND r.out_cosine IS NULL) AS image_id
FROM rows r LEFT JOIN rows ref ON ref.is_reference AND ref.image_id = r.image_id
WHERE r.status = 'ok' AND NOT r.is_reference
GROUP BY r.cell_id
