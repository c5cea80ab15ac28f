-- Precision each cell actually ran at (read back from its backend), one row per cell that has one.
SELECT cell_id, any_value(precision_effective) AS precision_effective
FROM rows WHERE precision_effective IS NOT NULL GROUP BY cell_id
