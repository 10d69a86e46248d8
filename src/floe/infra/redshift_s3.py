"""What Redshift's COPY (the destination) and UNLOAD (the SQL source) share: an S3 stage, the
credentials Redshift reads or writes it with, and Redshift's string literals."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator

from floe.core.settings import Model


def literal(value: str) -> str:
    """A Redshift string literal: quotes and backslashes doubled (what QUOTE_LITERAL does)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class RedshiftS3Config(Model):
    """An s3:// stage and how Redshift is allowed at it: an IAM role, or access keys."""

    statement: ClassVar[str] = "Redshift"  # what the missing-credentials error says needs them

    stage: str = Field(description="s3://bucket/prefix the staged files go to (COPY reads them, UNLOAD writes them).")
    iam_role: str | None = Field(default=None, description="An IAM role ARN the cluster may assume, or `default`.")
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    endpoint_url: str | None = None  # an S3-compatible endpoint floe itself uses (tests, MinIO)

    @field_validator("stage")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        if not value.startswith("s3://") or not value[5:].strip("/"):
            raise ValueError("must be an S3 URL like s3://bucket/prefix")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> RedshiftS3Config:
        keys = (self.aws_access_key_id is not None, self.aws_secret_access_key is not None)
        if keys[0] != keys[1]:
            raise ValueError("aws_access_key_id and aws_secret_access_key go together")
        if self.iam_role is None and not keys[0]:
            raise ValueError(f"{self.statement} needs credentials: set iam_role (or `default`) or "
                             "aws_access_key_id + aws_secret_access_key")
        return self

    def credentials_sql(self) -> str:
        """The statement's credentials clause: IAM_ROLE, else the access keys (and session token)."""
        if self.iam_role:
            return "IAM_ROLE default" if self.iam_role == "default" else f"IAM_ROLE {literal(self.iam_role)}"
        assert self.aws_access_key_id is not None and self.aws_secret_access_key is not None
        sql = (f"ACCESS_KEY_ID {literal(self.aws_access_key_id.get_secret_value())} "
               f"SECRET_ACCESS_KEY {literal(self.aws_secret_access_key.get_secret_value())}")
        if self.aws_session_token is not None:
            sql += f" SESSION_TOKEN {literal(self.aws_session_token.get_secret_value())}"
        return sql
