-- A seal's leaves are hashes: PostgreSQL's compression cannot shrink them
-- and only spends CPU trying (on every seal the relay leader stores).
ALTER TABLE seals ALTER COLUMN leaves SET STORAGE EXTERNAL;
