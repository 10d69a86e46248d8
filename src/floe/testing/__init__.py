"""Helpers for tests, benchmarks and demos: throwaway servers that floe talks to."""
