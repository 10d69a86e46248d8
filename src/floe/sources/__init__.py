"""Source plugins. One line per source type: `type:` -> "module:Class"."""

from floe.plugins import Registry

registry = Registry(
    "source",
    {
        "sailthru": "floe.sources.sailthru:SailthruSource",
        "twilio": "floe.sources.twilio:TwilioSource",
        "singular": "floe.sources.singular:SingularSource",
        "sql": "floe.sources.sql:SqlSource",
        "fullstory": "floe.sources.fullstory:FullStorySource",
    },
)
