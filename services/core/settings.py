"""Settings shared by every service: environment variables with one common prefix."""

from __future__ import annotations

import json

from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "EOML_"


class ServiceSettings(BaseSettings):
    """Base class for a service's settings; subclasses add their own fields.

    A field ``http_port`` of a subclass with ``env_prefix="EOML_INFERENCE_"`` reads
    ``EOML_INFERENCE_HTTP_PORT``.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    log_level: str = "INFO"
    log_format: str = "json"  # "json" for machines, "text" for people at a terminal


def comma_or_json_list(value: object, separator: str = ",") -> object:
    """A list setting from the environment: ``a,b`` (or another ``separator``) or a JSON array (a ``mode="before"``
    validator's body)."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            return json.loads(stripped)
        return [item.strip() for item in stripped.split(separator) if item.strip()]
    return value
