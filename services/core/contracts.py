"""Wire contracts of the production system (eo4eu-contracts.md sections 1, 3, 4), accepted unchanged.

Field names are exact, odd spellings included. Credentials are ``SecretStr`` so that no repr, log line or
error message ever shows them; ``reveal_credentials`` is the one explicit way to read them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, field_validator

PUBLISHED = "published"
STOPPING = "stopping"
# The DSL editor's other statuses: accepted, nothing to do.
IGNORED_STATUSES = frozenset({"compiling", "compiled", "publishing", "stopped", "completed", "error", "draft"})

NotificationStatus = Literal["START", "INFO", "WARNING", "SUCCESS", "CRITICAL"]
NOTIFICATION_DESCRIPTION_LIMIT = 300


class _Contract(BaseModel):
    # Unknown fields are kept: a DSL that adds fields must still be understood, and pass-through stays lossless.
    model_config = ConfigDict(populate_by_name=True, extra="allow")


class Topics(_Contract):
    in_: str = Field(alias="in", min_length=1)
    out: str = ""


class MLService(_Contract):
    ServiceName: str = ""
    Namespace: str = Field(min_length=1)
    component_name: str = ""


class S3Bucket(_Contract):
    aws_access_key_id: SecretStr
    aws_secret_access_key: SecretStr
    bucket_name: str = Field(alias="s3-bucket-name", min_length=1)
    region_name: str = "us-east-1"
    endpoint_url: str | None = None

    def reveal_credentials(self) -> dict[str, str]:
        return {
            "aws_access_key_id": self.aws_access_key_id.get_secret_value(),
            "aws_secret_access_key": self.aws_secret_access_key.get_secret_value(),
        }


class WorkflowMessage(_Contract):
    """DSL -> ML Controller on ``system.ML``. A stop message may omit ``S3_bucket`` and ``Topics.out``."""

    workflow_name: str = Field(min_length=1)
    workflow_status: str
    Topics: Topics
    ML: MLService
    S3_bucket: S3Bucket | None = None

    def model_post_init(self, _context: Any) -> None:
        # Every credential the message carries (S3 keys, values under credential-like keys anywhere) is masked in
        # this process's log lines from now on.
        from .redaction import remember_for_logs

        remember_for_logs(self)

    def credential_values(self) -> frozenset[str]:
        """Every credential value of the message, for ``services.core.redaction.Redactor``."""
        from .redaction import collect_secrets

        return collect_secrets(self)


class S3BucketDesc(_Contract):
    folder: str
    filename: str = ""


class StepMessage(_Contract):
    """Previous component -> Wrapper -> next component on ``Topics.in`` / ``Topics.out``."""

    previous_component_end: bool
    S3_bucket_desc: S3BucketDesc
    meta_information: dict[str, Any] = Field(default_factory=dict)

    @field_validator("previous_component_end", mode="before")
    @classmethod
    def _true_string(cls, value: object) -> object:
        # Production sends the string "True"; JSON true is accepted too. Anything else is not an end marker.
        if isinstance(value, str):
            if value not in ("True", "true", "False", "false"):
                raise ValueError(f"previous_component_end must be 'True' or true, got {value!r}")
            return value in ("True", "true")
        return value

    @field_serializer("previous_component_end")
    def _as_production_string(self, value: bool) -> str:
        return "True" if value else "False"


class NotificationOptional(_Contract):
    namespace: str = ""
    pod: str = ""


class Notification(_Contract):
    """Progress event on ``monitoring.notify``."""

    component_name: str
    workflow_name: str
    status: NotificationStatus
    description: str
    timestamp: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    optional: NotificationOptional = Field(default_factory=NotificationOptional)
    overwrite: bool = False

    @field_validator("description", mode="before")
    @classmethod
    def _limit(cls, value: object) -> object:
        if isinstance(value, str) and len(value) > NOTIFICATION_DESCRIPTION_LIMIT:
            return value[: NOTIFICATION_DESCRIPTION_LIMIT - 3] + "..."
        return value
