"""Destination plugins. One line per destination type: `type:` -> "module:Class"."""

from floe.plugins import Registry

registry = Registry(
    "destination",
    {
        "bigquery": "floe.destinations.bigquery:BigQueryDestination",
        "duckdb": "floe.destinations.duckdb:DuckDBDestination",
        "files": "floe.destinations.files:FilesDestination",
        "postgres": "floe.destinations.postgres:PostgresDestination",
        "redshift": "floe.destinations.redshift:RedshiftDestination",
    },
)
