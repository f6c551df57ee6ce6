"""The vocabulary of a step run: what was asked (``StepRequest``), the states a run goes through (``RunState``),
how it ends (``StepStatus``, ``StepOutcome``) and which failures are transient (``is_transient``).

A leaf of the Wrapper's import graph: the state machine (``pipeline``), the HTTP shell and the tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Mapping

from services.core.contracts import StepMessage
from services.wrapper.inference_client import InferenceError, InferenceUnavailable, ModelMismatch
from services.wrapper.inputs.types import InputError
from services.wrapper.outputs.types import OutputFormatError
from services.wrapper.results import ResultWriteError, S3ConfigurationError, WrittenObject, run_id
from services.wrapper.stopping import ProcessStopping

if TYPE_CHECKING:
    from services.wrapper.handlers.base import Rejection


class StepStatus(StrEnum):
    """How one delivery ended (the HTTP shell answers by it)."""

    SUCCESS = "SUCCESS"  # announced (now, or from the manifest of an interrupted run)
    CRITICAL = "CRITICAL"  # failed for good, on record (dead-letter record, CRITICAL, failed marker)
    RETRY = "RETRY"  # transient: nothing announced, nothing recorded; the delivery is answered 5xx
    DUPLICATE = "DUPLICATE"  # an earlier run of this delivery ended already (see ``Earlier``)
    IGNORED = "IGNORED"  # not a step to run (previous_component_end is not True)


class RunState(StrEnum):
    """Where a run of one delivery is; each state past ``CLAIMED`` is durable before the run moves on.

    ``CLAIMED``: the markers say no earlier run ended, the run folder is this run's to write (START sent);
    ``PROCESSED``: every result object is in S3; ``MANIFEST``: the create-only manifest is written (by this run or
    by a concurrent run of the same delivery); ``ANNOUNCED``: the next-step record is acknowledged by Kafka and the
    announced marker written; ``FAILED``: the dead-letter record is acknowledged, CRITICAL sent, failed marker
    written."""

    CLAIMED = "claimed"
    PROCESSED = "processed"
    MANIFEST = "manifest"
    ANNOUNCED = "announced"
    FAILED = "failed"


class Earlier(StrEnum):
    """What an earlier run of the same delivery left in S3."""

    NOTHING = ""
    ANNOUNCED = "announced"
    FAILED = "failed"
    MANIFEST = "manifest"  # complete, not announced yet (a Wrapper stopped between manifest and announcement)


class NoUsableInput(Exception):
    """Every patch or file of the input was rejected."""


class PublishError(Exception):
    """The next step message could not be delivered."""


class StepRetry(Exception):
    """A failure that a later delivery may not meet: nothing is put on record, the delivery is answered 5xx."""


@dataclass(frozen=True, slots=True)
class StepRequest:
    """A step message as delivered, with what the delivery says about it."""

    config_name: str
    message: StepMessage
    raw_message: Any  # the body as received (parsed JSON), for the dead-letter record
    event_id: str = ""
    # The event's time (CloudEvent ``time``; a KafkaSource sets the record's timestamp): stamps time-tagged outputs,
    # so that a redelivery writes identical bytes.
    event_time: datetime | None = None
    event_source: str = ""
    # ``results.run_id`` of the delivery; "" = derived from the fields above (random without an event id).
    run_id: str = ""
    # The event's W3C trace context (``traceparent``/``tracestate`` extension attributes; ``services.core.tracing``).
    trace_attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.run_id:
            time_text = self.event_time.isoformat() if self.event_time is not None else ""
            object.__setattr__(self, "run_id", run_id(self.config_name, self.event_source, self.event_id, time_text))


@dataclass
class StepOutcome:
    status: StepStatus
    reason: str = ""
    # Where the results are: the announced (winning attempt) folder once announced; before that the run folder.
    output_folder: str | None = None
    run_folder: str | None = None  # manifest and markers are beside it
    announced_folder: str | None = None
    patches: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    objects: list[WrittenObject] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    next_message: dict[str, Any] | None = None
    model_version: str = ""
    # DUPLICATE: what the earlier run of this delivery ended with (ANNOUNCED or FAILED).
    earlier: Earlier = Earlier.NOTHING
    # SUCCESS without processing: the manifest was there, the announcement was not.
    resumed_announcement: bool = False
    # The states this run went through, in order (logs and tests).
    states: list[RunState] = field(default_factory=list)


def is_transient(error: BaseException) -> bool:
    """Failures a later delivery may not meet: the delivery is answered 5xx and redelivered, nothing is recorded.

    The one place that decides it (``ProcessStopping``: raised because the process is stopping)."""
    if isinstance(error, (InferenceUnavailable, PublishError, StepRetry, ProcessStopping)):
        return True
    return isinstance(error, (InputError, ResultWriteError)) and bool(getattr(error, "transient", False))


def failure_reason(error: BaseException) -> str:
    """A sentence for people (CRITICAL description, dead-letter record) saying why the step failed."""
    if isinstance(error, InputError):
        return f"Input error: {error}"
    if isinstance(error, InferenceUnavailable):
        return f"Inference server unavailable: {error}"
    if isinstance(error, ModelMismatch):
        return f"Model does not fit the task: {error}"
    if isinstance(error, InferenceError):
        return f"Inference failed: {error}"
    if isinstance(error, S3ConfigurationError):
        return f"S3 configuration error: {error}"
    if isinstance(error, ResultWriteError):
        return f"Writing results failed: {error}"
    if isinstance(error, OutputFormatError):
        return f"Results could not be encoded: {error}"
    if isinstance(error, (NoUsableInput, PublishError, StepRetry, ProcessStopping)):
        return str(error)
    return f"Internal error: {type(error).__name__}: {error}"


# Failures that are the input's or the deployment's, expected and explained: logged without a traceback.
EXPLAINED_FAILURES = (InputError, InferenceError, ResultWriteError, OutputFormatError, NoUsableInput,
                      S3ConfigurationError)
