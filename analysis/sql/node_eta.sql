-- Share of the output variance (cosine distance, ok rows) explained by the node that computed
-- each row, within its cell: sum over (cell, node) of n * (node mean - cell mean)^2, over the
-- total sum of squares. NULL when one node computed every row.
WITH r AS (
    SELECT cell_id, node, 1 - out_cosine AS y FROM rows
    WHERE status = 'ok' AND out_cosine IS NOT NULL AND node IS NOT NULL
), c AS (SELECT cell_id, avg(y) AS m FROM r GROUP BY cell_id),
g AS (SELECT cell_id, node, avg(y) AS m, count(*) AS n FROM r GROUP BY cell_id, node),
t AS (SELECT sum((y - (SELECT avg(y) FROM r)) ^ 2) AS ss FROM r)
SELECT CASE WHEN (SELECT count(DISTINCT node) FROM r) < 2 OR (SELECT ss FROM t) = 0 THEN NULL
            ELSE (SELECT sum(g.n * (g.m - c.m) ^ 2) FROM g JOIN c USING (cell_id)) / (SELECT ss FROM t)
       END AS node_eta
