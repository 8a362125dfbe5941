-- Stores a snapshot unless a newer one (same snapshot version) is there.
INSERT INTO snapshots (stream_id, stream_version, snapshot_version, tenant, state)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (stream_id) DO UPDATE
SET stream_version = EXCLUDED.stream_version,
    snapshot_version = EXCLUDED.snapshot_version,
    tenant = EXCLUDED.tenant,
    state = EXCLUDED.state,
    taken_at = now()
WHERE snapshots.stream_version < EXCLUDED.stream_version
   OR snapshots.snapshot_version <> EXCLUDED.snapshot_version
