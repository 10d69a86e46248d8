"""Source plugins. One line per source type: `type:` -> "module:Class"."""

from floe.plugins import Registry

registry = Registry(
    "source",
    {
        "sailthru": "floe.sources.sailthru:SailthruSource",
    },
)
