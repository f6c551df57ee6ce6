"""Per-stage time of a step: stages nest without counting time twice, follow the step into worker threads, and
cost nothing outside a step."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from services.core.metrics import (
    ErrorSource,
    Stage,
    WrapperMetrics,
    count_error,
    in_current_context,
    stage,
    timed_items,
    timed_stage,
)


@timed_stage(Stage.DECODE)
def decode(value: int) -> int:
    time.sleep(0.1)
    return value


def read_input() -> object:
    for value in range(3):
        time.sleep(0.01)  # "download"
        yield decode(value)


def test_inner_stages_are_not_counted_again_in_the_outer_one() -> None:
    metrics = WrapperMetrics()
    with metrics.step("classify") as clock:
        assert list(timed_items(Stage.DOWNLOAD, read_input())) == [0, 1, 2]
    assert clock.seconds[Stage.DECODE] >= 0.3
    # 3 x 10 ms of "download", without the 300 ms of decoding inside it (bounds wide for a loaded machine).
    assert 0.03 <= clock.seconds[Stage.DOWNLOAD] < 0.25
    metrics.step_ended("classify", "SUCCESS", clock, patches=3)
    sample = metrics.registry.get_sample_value
    assert sample("eoml_step_stage_seconds_count", {"task": "classify", "stage": "decode"}) == 1
    assert sample("eoml_step_stage_seconds_sum", {"task": "classify", "stage": "decode"}) == clock.seconds[Stage.DECODE]
    assert sample("eoml_steps_total", {"task": "classify", "outcome": "succeeded"}) == 1
    assert sample("eoml_patches_total", {"task": "classify"}) == 3


def test_the_step_follows_work_into_other_threads() -> None:
    metrics = WrapperMetrics()

    @timed_stage(Stage.INFERENCE)
    def infer() -> None:
        time.sleep(0.03)
        count_error(ErrorSource.KAFKA)

    with ThreadPoolExecutor(2) as pool, metrics.step("compress") as clock:
        for future in [pool.submit(in_current_context(infer)) for _ in range(2)]:
            future.result()
        pool.submit(infer).result()  # without the step's context: not counted
    assert clock.seconds[Stage.INFERENCE] >= 0.06
    assert metrics.registry.get_sample_value("eoml_dependency_errors_total",
                                             {"task": "compress", "source": "kafka"}) == 2


def test_outcomes_and_dead_letters() -> None:
    metrics = WrapperMetrics()
    for status in ("SUCCESS", "CRITICAL", "RETRY", "DUPLICATE", "IGNORED", "CRITICAL"):
        with metrics.step("uc5-cfactor") as clock:
            pass
        metrics.step_ended("uc5-cfactor", status, clock, patches=2, rejections=1)
    sample = metrics.registry.get_sample_value
    assert {outcome: sample("eoml_steps_total", {"task": "uc5-cfactor", "outcome": outcome})
            for outcome in ("succeeded", "failed", "retried", "duplicate", "ignored")} == \
        {"succeeded": 1, "failed": 2, "retried": 1, "duplicate": 1, "ignored": 1}
    assert sample("eoml_dead_letter_records_total", {"task": "uc5-cfactor"}) == 2
    assert sample("eoml_patches_total", {"task": "uc5-cfactor"}) == 2  # succeeded steps only
    assert sample("eoml_steps_started_total", {"task": "uc5-cfactor"}) == 6


def test_outside_a_step_nothing_is_recorded() -> None:
    with stage(Stage.WRITE):
        count_error(ErrorSource.S3)
    assert decode(4) == 4
    assert list(timed_items(Stage.DOWNLOAD, iter([1]))) == [1]
    assert WrapperMetrics().registry.get_sample_value("eoml_dependency_errors_total",
                                                      {"task": "x", "source": "s3"}) is None
