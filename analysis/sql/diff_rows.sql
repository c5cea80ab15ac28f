-- One run's side of `dmx diff`: per (cell, image) the numbers compared across runs, and the
-- intra-op threads the backend ran with (null for runs written before rows recorded them), and
-- out_digest (hex of sha256 over the output tensor's bytes; null for runs written before rows
-- carried it). Read for one pass of cells at a time ($cells), so that only that many rows of
-- each run are held for the join.
SELECT r.cell_id, r.image_id, c.label, r.status, r.error_stage,
       r.out_max_abs, 1 - r.out_cosine AS cos_dist, r.top1, r.top1_agree,
       r.top5_prob[1] AS top1_prob, r.threads_used, r.out_digest
FROM rows r JOIN cells c USING (cell_id)
WHERE list_contains($cells, r.cell_id)
