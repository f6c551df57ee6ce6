"""Settings of the inference server: ``EOML_INFERENCE_*`` environment variables, overridden by CLI options.

Lists come from the environment as JSON (``EOML_INFERENCE_MODEL_REPOSITORY='["/models"]'``) or as a
comma-separated string (``EOML_INFERENCE_LOAD_MODEL=a,b``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.core.settings import ENV_PREFIX, ServiceSettings, comma_or_json_list

MIB = 1024 * 1024
# gRPC's own default (4 MiB) is too small for a batch of Sentinel-2 tiles (576 KB each).
MIN_GRPC_MESSAGE_BYTES = 64 * MIB


class InferenceServerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}INFERENCE_", extra="ignore")

    model_repository: Annotated[list[str], NoDecode] = Field(default_factory=list)
    model_control_mode: Literal["none", "poll", "explicit"] = "none"
    load_model: Annotated[list[str], NoDecode] = Field(default_factory=list)
    repository_poll_secs: float = Field(15.0, gt=0)

    allow_http: bool = True
    allow_grpc: bool = True
    allow_metrics: bool = True
    http_address: str = "0.0.0.0"
    grpc_address: str = "0.0.0.0"
    metrics_address: str = ""  # "" = the HTTP address, as Triton does
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535)
    metrics_port: int = Field(8002, ge=0, le=65535)
    http_max_body_size: int = Field(64 * MIB, gt=0)
    grpc_max_message_size: int = Field(64 * MIB, ge=MIN_GRPC_MESSAGE_BYTES)

    log_verbose: int = Field(0, ge=0)
    exit_timeout_secs: float = Field(30.0, ge=0)
    exit_on_error: bool = True
    strict_readiness: bool = True
    # Queue bound for models whose config sets none; 0 = unbounded, as in Triton. A config's
    # dynamic_batching.default_queue_policy.max_queue_size wins.
    default_max_queue_size: int = Field(0, ge=0)
    # Triton's restricted APIs, "<api>[,<api>...]:<key>=<value>" each (services.inference.restricted_api).
    # From the environment: a JSON list, or specs separated by ';' (a spec itself holds commas).
    http_restricted_api: Annotated[list[str], NoDecode] = Field(default_factory=list)
    grpc_restricted_protocol: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The value for specs given without one ("<api>[,<api>...]:<key>"), so that it is on no command line: a file
    # (a mounted Secret; wins) or the environment variable EOML_INFERENCE_RESTRICTED_API_KEY.
    restricted_api_key_file: str = ""
    restricted_api_key: SecretStr = SecretStr("")

    @field_validator("model_repository", "load_model", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return comma_or_json_list(value)

    @field_validator("http_restricted_api", "grpc_restricted_protocol", mode="before")
    @classmethod
    def _restriction_lists(cls, value: object) -> object:
        # ";" between specs: a spec itself lists API groups with commas.
        return comma_or_json_list(value, ";")

    def restricted_api_key_value(self) -> str | None:
        """The restricted-API key from the file (trailing newlines dropped) or the environment; None if neither."""
        if self.restricted_api_key_file:
            try:
                key = Path(self.restricted_api_key_file).read_text().rstrip("\r\n")
            except OSError as error:
                raise ValueError(f"restricted API key file {self.restricted_api_key_file}: {error.strerror}") from None
            if not key:
                raise ValueError(f"restricted API key file {self.restricted_api_key_file} is empty")
            return key
        return self.restricted_api_key.get_secret_value() or None

    @model_validator(mode="after")
    def _consistent(self) -> "InferenceServerSettings":
        from .restricted_api import parse_restrictions

        key_value = self.restricted_api_key_value()
        parse_restrictions(self.http_restricted_api, "--http-restricted-api", key_value)
        parse_restrictions(self.grpc_restricted_protocol, "--grpc-restricted-protocol", key_value)
        if not self.model_repository:
            raise ValueError("at least one model repository is required (--model-repository)")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError("--load-model needs --model-control-mode explicit")
        if self.log_verbose > 0:
            self.log_level = "DEBUG"
        return self

    @property
    def effective_metrics_address(self) -> str:
        return self.metrics_address or self.http_address
