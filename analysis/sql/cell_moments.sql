-- Per cell: count, mean and within-cell sum of squares of the cosine distance 1 - cos over
-- the ok rows with a finite value - all the type-II attribution (analysis/effects.py) needs.
-- Grouped by the cell id alone (one key; the levels are joined from the cells table).
SELECT cell_id, count(*) AS n, avg(m) AS mean, coalesce(var_pop(m), 0) * count(*) AS ssw
FROM (SELECT cell_id, (1 - out_cosine)::DOUBLE AS m FROM rows
      WHERE status = 'ok' AND out_cosine IS NOT NULL)
WHERE NOT isnan(m)
GROUP BY cell_id
