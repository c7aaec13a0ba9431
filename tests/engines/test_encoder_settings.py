"""The worker's encoder settings as the environment gives them."""

from __future__ import annotations

import pytest

from segq.settings import Settings, SettingsError


def settings(**env: str) -> Settings:
    return Settings.from_env({"SEGQ_SECRET_KEY": "k", **env})


def test_defaults_leave_the_device_to_choose() -> None:
    found = settings()
    assert found.engine_batch is None  # 1 on a CPU, 8 on CUDA (worker/engines/sam_encoder.py)
    assert (found.engine_batch_wait_ms, found.precision, found.compile_encoder) == (
        10,
        "auto",
        False,
    )


def test_values_are_read() -> None:
    found = settings(
        SEGQ_ENGINE_BATCH="16",
        SEGQ_ENGINE_BATCH_WAIT_MS="0",
        SEGQ_PRECISION="bf16",
        SEGQ_COMPILE="1",
    )
    assert (found.engine_batch, found.engine_batch_wait_ms) == (16, 0)
    assert (found.precision, found.compile_encoder) == ("bf16", True)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("SEGQ_ENGINE_BATCH", "0", "must be positive"),
        ("SEGQ_ENGINE_BATCH", "eight", "must be an integer"),
        ("SEGQ_ENGINE_BATCH_WAIT_MS", "-1", "between 0 and 60000"),
        ("SEGQ_ENGINE_BATCH_WAIT_MS", "soon", "must be an integer"),
        ("SEGQ_PRECISION", "int8", "must be one of auto, fp32, bf16, fp16"),
        ("SEGQ_COMPILE", "maybe", "must be 1 or 0"),
    ],
)
def test_bad_values_are_refused_by_name(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError, match=says) as refused:
        settings(**{name: value})
    assert name in str(refused.value)


def test_a_batch_may_not_wait_for_company_past_half_a_lease() -> None:
    """Items claimed first keep leases that are renewed only once the batch
    runs: a wait as long as the lease would have them taken for abandoned."""
    with pytest.raises(SettingsError, match="at most half of SEGQ_LEASE_SECONDS"):
        settings(SEGQ_ENGINE_BATCH_WAIT_MS="40000")
    assert settings(SEGQ_ENGINE_BATCH_WAIT_MS="30000").engine_batch_wait_ms == 30000
    longer = settings(SEGQ_LEASE_SECONDS="120", SEGQ_ENGINE_BATCH_WAIT_MS="60000")
    assert longer.engine_batch_wait_ms == 60000
