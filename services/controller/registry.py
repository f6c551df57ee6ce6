"""What the controller knows about workflows and their steps, for the status API (``GET /workflows``).

Rebuilt from the step-config store at start (stored steps are wired steps), then updated by every handled message.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from services.core.step_config import StepConfig

WIRED = "wired"
STOPPED = "stopped"
FAILED = "failed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class StepState:
    workflow_name: str
    namespace: str
    config_name: str
    topic_in: str
    topic_out: str = ""
    service_name: str = ""
    component_name: str = ""
    state: str = WIRED
    source: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    updated_at: str = field(default_factory=_now)


def workflow_state(steps: list[StepState]) -> str:
    states = {step.state for step in steps}
    if FAILED in states:
        return FAILED
    if states == {STOPPED}:
        return STOPPED
    if states == {WIRED}:
        return "running"
    return "partially-stopped"


class WorkflowRegistry:
    """Thread-safe: the HTTP handlers and the Kafka consumer both update it."""

    def __init__(self) -> None:
        self._steps: dict[str, dict[tuple[str, str], StepState]] = {}
        self._lock = threading.Lock()

    def _put(self, state: StepState) -> None:
        with self._lock:
            steps = self._steps.setdefault(state.workflow_name, {})
            # A topic belongs to one workflow at a time: a re-publish under another name moves it.
            for other_name, other_steps in list(self._steps.items()):
                if other_name != state.workflow_name:
                    other_steps.pop((state.namespace, state.config_name), None)
                    if not other_steps:
                        del self._steps[other_name]
            steps[(state.namespace, state.config_name)] = state

    def wired(self, config: StepConfig, source: dict[str, Any]) -> None:
        self._put(StepState(workflow_name=config.workflow_name, namespace=config.namespace,
                            config_name=config.config_name, topic_in=config.topic_in, topic_out=config.topic_out,
                            service_name=config.service_name, component_name=config.component_name,
                            state=WIRED, source=source))

    def failed(self, workflow_name: str, namespace: str, config_name: str, topic_in: str, error: str,
               config: StepConfig | None = None) -> None:
        self._put(StepState(workflow_name=workflow_name, namespace=namespace, config_name=config_name,
                            topic_in=topic_in, topic_out=config.topic_out if config else "",
                            service_name=config.service_name if config else "",
                            component_name=config.component_name if config else "", state=FAILED, error=error))

    def stopped(self, workflow_name: str, namespace: str, config_name: str, topic_in: str) -> None:
        with self._lock:
            for steps in self._steps.values():
                known = steps.get((namespace, config_name))
                if known is not None:
                    known.state, known.error, known.updated_at = STOPPED, "", _now()
                    return
        self._put(StepState(workflow_name=workflow_name, namespace=namespace, config_name=config_name,
                            topic_in=topic_in, state=STOPPED))

    def steps(self, workflow_name: str) -> list[StepState]:
        with self._lock:
            return [StepState(**asdict(s)) for s in self._steps.get(workflow_name, {}).values()]

    def count_in_state(self, state: str) -> int:
        with self._lock:
            return sum(step.state == state for steps in self._steps.values() for step in steps.values())

    def workflow_names(self) -> list[str]:
        with self._lock:
            return sorted(self._steps)

    def summary(self, workflow_name: str, live: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict | None:
        steps = sorted(self.steps(workflow_name), key=lambda s: (s.namespace, s.topic_in))
        if not steps:
            return None
        rendered = []
        for step in steps:
            entry = asdict(step)
            if live and (step.namespace, step.config_name) in live:
                entry["live"] = live[(step.namespace, step.config_name)]
            rendered.append(entry)
        return {"name": workflow_name, "state": workflow_state(steps), "steps": rendered}
