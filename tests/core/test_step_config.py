import os
import re
import stat

import pytest

from services.core.contracts import WorkflowMessage
from services.core.step_config import (
    LocalStepConfigStore,
    StepConfigNotFound,
    StepConfigStore,
    dns1123_name,
    step_config_from_message,
    step_config_name,
)

from test_contracts import PRODUCTION_WORKFLOW

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("topic", ["wf.uc5.ml-in", "WF_UC5__In", "a" * 300, "...", "Ünïcode.topic"])
def test_names_are_dns1123_labels(topic):
    name = step_config_name(topic)
    assert DNS1123.match(name) and len(name) <= 63
    assert name.startswith("json-config-") or len(topic.strip(".")) == 0


def test_topics_that_sanitise_alike_do_not_collide():
    topics = ["a.b", "a_b", "A-B", "a-b", "x" * 200 + "1", "x" * 200 + "2"]
    names = {dns1123_name(t) for t in topics}
    assert len(names) == len(topics)


def test_published_message_splits_settings_from_credentials(tmp_path):
    message = WorkflowMessage.model_validate(PRODUCTION_WORKFLOW)
    config, credentials = step_config_from_message(message, "127.0.0.1:9092")
    assert config.topic_in == "wf.uc5.ml-in" and config.bucket == "workflow-bucket"
    assert "very-secret-value" not in config.model_dump_json()
    assert credentials.aws_secret_access_key.get_secret_value() == "very-secret-value"

    store = LocalStepConfigStore(tmp_path)
    assert isinstance(store, StepConfigStore)
    store.put("uc5", config, credentials)
    store.put("uc5", config, credentials)  # re-publishing is idempotent
    loaded, loaded_credentials = store.get("uc5", config.config_name)
    assert loaded == config and loaded_credentials == credentials
    assert [c.config_name for c in store.list()] == [config.config_name]
    secret_file = tmp_path / "uc5" / f"{config.config_name}.credentials.json"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert "very-secret-value" not in (tmp_path / "uc5" / f"{config.config_name}.json").read_text()

    assert store.delete("uc5", config.config_name) is True
    assert store.delete("uc5", config.config_name) is False
    with pytest.raises(StepConfigNotFound):
        store.get("uc5", config.config_name)


def test_store_refuses_path_tricks(tmp_path):
    store = LocalStepConfigStore(tmp_path)
    with pytest.raises(ValueError):
        store.get("../etc", "x")
