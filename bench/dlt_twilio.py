"""Load the Twilio emulator's calls with dlt's `rest_api` source into DuckDB (run with .venv-bench/bin/python).

Usage: dlt_twilio.py BASE_URL ACCOUNT_SID AUTH_TOKEN DUCKDB_PATH PIPELINES_DIR
Prints one JSON line: {"rows": ...}.
"""

from __future__ import annotations

import json
import sys

import dlt
from dlt.sources.rest_api import rest_api_source


def main() -> None:
    base_url, sid, token, db_path, pipelines_dir = sys.argv[1:6]
    source = rest_api_source({
        "client": {
            "base_url": base_url + "/",
            "auth": {"type": "http_basic", "username": sid, "password": token},
            "paginator": {"type": "json_link", "next_url_path": "next_page_uri"},
        },
        "resources": [{
            "name": "calls",
            "primary_key": "sid",
            "write_disposition": "merge",
            "endpoint": {"path": f"2010-04-01/Accounts/{sid}/Calls.json", "params": {"PageSize": 1000},
                         "data_selector": "calls"},
        }],
    })
    pipeline = dlt.pipeline(pipeline_name="twilio_bench", destination=dlt.destinations.duckdb(db_path),
                            dataset_name="twilio", pipelines_dir=pipelines_dir)
    pipeline.run(source)
    with pipeline.sql_client() as client:
        rows = client.execute_sql("SELECT count(*) FROM calls")[0][0]
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
