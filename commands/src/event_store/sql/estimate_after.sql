-- PostgreSQL's planner estimate of how many events lie after position $1:
-- from the column's statistics, and the index's actual end for a range
-- beyond them; reads no rows. `lag` uses it past what it counts exactly.
EXPLAIN (FORMAT JSON) SELECT 1 FROM events WHERE position > $1
