-- Precision each cell actually ran at (read back from its backend), per cell and precision:
-- a cell whose rows ran at two (bf16 on nodes with AMX, fp32 on the others) has two rows here.
-- n: the rows that ran at it.
SELECT cell_id, precision_effective, count(*) AS n
FROM rows WHERE precision_effective IS NOT NULL GROUP BY cell_id, precision_effective
ORDER BY cell_id, n DESC, precision_effective
