"""Plugins that tests install through entry points (see tests/test_chaos.py)."""
