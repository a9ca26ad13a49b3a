"""Replays real datasets as event streams through Kafka into the streaming learner (`simulator replay`)."""
