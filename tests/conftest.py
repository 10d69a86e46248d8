"""Shared pytest set-up. Fixture modules live in tests/fixtures/ and are listed here, one line each."""

pytest_plugins = [
    "tests.fixtures.core",
    "tests.fixtures.postgres",
    "tests.fixtures.objectstores",
    "tests.fixtures.sailthru",
    "tests.fixtures.apis",
    "tests.fixtures.fullstory",
    "tests.fixtures.destinations",
    "tests.fixtures.redshift_unload",
]
