-- How many nodes computed the run's rows. Nodes process disjoint chunks, so a node's rows are
-- other images than another node's: explain counts them and never ranks node like a factor.
SELECT count(DISTINCT node) AS nodes FROM rows WHERE node IS NOT NULL
