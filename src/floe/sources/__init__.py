"""Source plugins, one module (or package) each; registered in `floe.core.plugins.source_registry`."""
