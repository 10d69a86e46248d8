"""The engine: streams of Arrow batches, staging to Parquet, and exactly-once loads."""
