-- The accuracy view: per cell, its label and the counts of sql/accuracy_cells.sql (n labelled,
-- n judged, top-1 and top-5 in points).
SELECT c.label AS cell, a.* FROM accuracy_cells_counts a JOIN cells c USING (cell_id)
ORDER BY a.cell_id
