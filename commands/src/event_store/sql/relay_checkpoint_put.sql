INSERT INTO relay_checkpoints (relay, position, jetstream_sequence, updated_at)
VALUES ($1, $2, $3, now())
ON CONFLICT (relay) DO UPDATE
SET position = EXCLUDED.position,
    jetstream_sequence = EXCLUDED.jetstream_sequence,
    updated_at = now()
