"""kdcurate stages 1–3: score unlabeled collections with a teacher, query the pool, export shards."""
