-- Stores a snapshot unless a newer one (same snapshot version) is there, or
-- the stream's events were erased in the last ten minutes: a state folded
-- before an erasure may still hold the erased values (README, "Erasure";
-- handlers forget such states within a second of the erasure's NOTIFY).
INSERT INTO snapshots (stream_id, stream_version, snapshot_version, tenant, state)
SELECT $1, $2, $3, $4, $5
WHERE NOT EXISTS (
    SELECT 1 FROM tombstones
    WHERE stream_id = $1 AND erased_at > now() - interval '10 minutes'
)
ON CONFLICT (stream_id) DO UPDATE
SET stream_version = EXCLUDED.stream_version,
    snapshot_version = EXCLUDED.snapshot_version,
    tenant = EXCLUDED.tenant,
    state = EXCLUDED.state,
    taken_at = now()
WHERE snapshots.stream_version < EXCLUDED.stream_version
   OR snapshots.snapshot_version <> EXCLUDED.snapshot_version
