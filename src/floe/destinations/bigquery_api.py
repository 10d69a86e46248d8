"""The few BigQuery REST calls floe needs (insert a job, wait for it, read query results) and the
named query parameters they take."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from floe.core.errors import DestinationError
from floe.core.secrets import redact

if TYPE_CHECKING:
    from floe.destinations.bigquery import BigQueryConfig

log = logging.getLogger("floe.bigquery")

API = "https://bigquery.googleapis.com"
# BigQuery's answers to two jobs changing one table's schema at once: wait and run the DDL again.
DDL_RACES = ("concurrent update", "Exceeded rate limits", "rateLimitExceeded", "Already Exists")
DDL_RETRIES = 5
SCOPES = ["https://www.googleapis.com/auth/bigquery", "https://www.googleapis.com/auth/devstorage.read_write"]


def param(name: str, kind: str, value: Any) -> dict[str, Any]:
    """A named query parameter of the jobs API."""
    return {"name": name, "parameterType": {"type": kind},
            "parameterValue": {"value": None if value is None else str(value)}}


def scalar_type(value: Any) -> str:
    """The query parameter type of a Python value (a refresh scope's start)."""
    if isinstance(value, datetime):
        return "TIMESTAMP" if value.tzinfo else "DATETIME"
    if isinstance(value, date):
        return "DATE"
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    return "FLOAT64" if isinstance(value, float) else "STRING"


class BigQueryApi:
    """The few BigQuery REST calls floe needs: insert a job, wait for it, read query results."""

    def __init__(self, config: BigQueryConfig, where: str) -> None:
        import httpx

        self.config, self.where = config, where
        self.base = f"{config.api_endpoint.rstrip('/')}/bigquery/v2/projects/{config.project}"
        self._credentials: Any = None
        self.http = httpx.Client(timeout=60)

    def _headers(self) -> dict[str, str]:
        if self.config.api_endpoint != API:
            return {}
        import google.auth
        from google.auth.transport.requests import Request

        try:
            if self._credentials is None:
                self._credentials, _ = google.auth.default(scopes=SCOPES)
            if not self._credentials.valid:
                self._credentials.refresh(Request())
        except Exception as exc:  # DefaultCredentialsError, RefreshError
            raise DestinationError(f"{self.where}: no usable Google Cloud credentials in the environment: {exc}") from None
        return {"Authorization": f"Bearer {self._credentials.token}"}

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.http.request(method, self.base + path, headers=self._headers(), **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - any non-JSON error body
                message = response.text[:300]
            raise DestinationError(f"{self.where}: BigQuery {method} {path.split('?')[0]}: HTTP "
                                   f"{response.status_code}: {redact(message)}")
        return dict(response.json()) if response.content else {}

    def run_job(self, job_id: str, configuration: dict[str, Any], poll: float = 0.5) -> dict[str, Any]:
        """Insert a job (an existing job with that id is awaited instead) and wait until it is DONE."""
        body = {"jobReference": {"projectId": self.config.project, "jobId": job_id,
                                 "location": self.config.location}, "configuration": configuration}
        try:
            job = self.call("POST", "/jobs", json=body)
        except DestinationError as exc:
            if "HTTP 409" not in str(exc):
                raise
            job = {"status": {"state": "PENDING"}}
        while job.get("status", {}).get("state") != "DONE":
            time.sleep(poll)
            poll = min(poll * 1.5, 5.0)
            job = self.call("GET", f"/jobs/{job_id}?location={self.config.location}")
        error = job["status"].get("errorResult")
        if error:
            raise DestinationError(f"{self.where}: BigQuery job {job_id} failed: {redact(error.get('message', ''))}")
        return job

    def query(self, sql: str, parameters: list[dict[str, Any]] | None = None, job_id: str | None = None) -> list[list[Any]]:
        job_id = job_id or f"floe_q_{uuid.uuid4().hex}"
        config = {"query": {"query": sql, "useLegacySql": False, "parameterMode": "NAMED",
                            "queryParameters": parameters or []}}
        self.run_job(job_id, config)
        answer = self.call("GET", f"/queries/{job_id}?location={self.config.location}")
        return [[cell.get("v") for cell in row["f"]] for row in answer.get("rows", [])]

    def ddl(self, statement: str) -> None:
        """Run a DDL statement, again (after a pause) while BigQuery refuses it because another job is
        changing the same table."""
        for attempt in range(DDL_RETRIES):
            try:
                self.query(statement)
                return
            except DestinationError as exc:
                if attempt + 1 == DDL_RETRIES or not any(race in str(exc) for race in DDL_RACES):
                    raise
                log.info("event=ddl_race where=%s attempt=%d error=%s", self.where, attempt + 1, exc)
                time.sleep(2**attempt)
