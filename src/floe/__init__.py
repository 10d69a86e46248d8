"""floe: warehouse SaaS data exactly once, and sync warehouse facts back into SaaS tools."""

__version__ = "0.1.0"
