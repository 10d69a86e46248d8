"""Products built on the engine: serve, notify, reverse ETL, Singer, the demo."""
