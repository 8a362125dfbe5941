-- Current version of a stream of tenant $1 (0 when it has no events, or when
-- they belong to another tenant). $2 stream id.
SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $2 AND tenant = $1
