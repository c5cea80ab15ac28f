-- Per cell and effective precision (as cell_stats.sql), the distribution-free 95% interval of
-- the median cosine distance: the order statistics x_(j) and x_(n+1-j) of the n finite values,
-- j = floor(n/2 - 0.98 sqrt(n) + 0.5) (the binomial's normal approximation with continuity
-- correction: coverage >= 95.0% for every n >= 6, the exact ranks for 2,977 of n = 1..3,000).
-- Below n = 6 no pair of ranks reaches 95%: the interval is [min, max] (coverage 1 - 2^(1-n)).
WITH v AS (
    SELECT cell_id, precision_effective,
           list_sort(list(greatest(1 - out_cosine, 0.0))
                     FILTER (WHERE isfinite(out_cosine) AND coalesce(isfinite(out_max_abs), true))) AS s
    FROM rows
    WHERE status = 'ok' AND out_cosine IS NOT NULL AND list_contains($cells, cell_id)
    GROUP BY cell_id, precision_effective
), k AS (
    SELECT *, len(s) AS n, greatest(1, floor(len(s) / 2 - 0.98 * sqrt(len(s)) + 0.5))::BIGINT AS j
    FROM v
)
SELECT cell_id, precision_effective, n, s[j] AS lo, s[n + 1 - j] AS hi FROM k
