"""A built pool: its pool.json format, loading with checks, composition of a query, and evaluation."""
