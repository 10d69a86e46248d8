"""Shared machinery: HTTP, stage files, object stores, PostgreSQL wire, PII, logs, threads."""
