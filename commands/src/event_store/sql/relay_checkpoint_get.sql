SELECT position, jetstream_sequence FROM relay_checkpoints WHERE relay = $1
