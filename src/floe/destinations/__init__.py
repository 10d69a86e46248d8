"""Destination plugins, one module each; registered in `floe.core.plugins.destination_registry`."""
