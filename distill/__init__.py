"""kdcurate stage 4: the model zoo, the teacher loader, and training students from shards."""
