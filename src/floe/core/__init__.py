"""Contracts: streams and sources, the destination ABC, settings, errors, secrets, the plugin registry."""
