-- How many events lie after position $1 (capped at $2): a reader's lag.
SELECT count(*) FROM (SELECT 1 FROM events WHERE position > $1 LIMIT $2) AS behind
