"""Each setting's default and environment variable are stated once, on its
field (segq/settings.py), and from_env reads every field by them."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from segq.settings import ENV_VAR_KEY, EnvVar, Settings, SettingsError

#: Derived from SEGQ_DATA_DIR when unset, so they have no field default.
DERIVED = {"data_dir", "database_url", "storage_url", "secret_key"}
READ = [setting for setting in fields(Settings) if setting.name not in DERIVED]


def env_var(name: str) -> EnvVar:
    found: EnvVar = next(f for f in fields(Settings) if f.name == name).metadata[ENV_VAR_KEY]
    return found


def test_every_setting_names_one_variable_of_its_own() -> None:
    names = [env_var(setting.name).name for setting in READ]
    assert all(name.startswith("SEGQ_") for name in names)
    assert len(set(names)) == len(names)
    assert all(setting.default is not MISSING for setting in READ)


def test_an_empty_environment_gives_every_field_its_default(tmp_path: Path) -> None:
    settings = Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path)})
    for setting in READ:
        assert getattr(settings, setting.name) == setting.default, setting.name
    assert settings.database_url == f"sqlite:///{tmp_path / 'segq.db'}"
    assert settings.storage_url == (tmp_path / "objects").as_uri()
    assert settings.secret_key == (tmp_path / "secret_key").read_text().strip()


@pytest.mark.parametrize(
    ("field_name", "raw", "value"),
    [
        ("max_upload_bytes", "1234", 1234),
        ("job_retention_days", "3", 3),
        ("webhook_retry_delays", "1, 2", (1, 2)),
        ("webhook_poll_seconds", "0.5", 0.5),
        ("engine_batch_wait_ms", "0", 0),
        ("precision", "bf16", "bf16"),
        ("compile_encoder", "yes", True),
        ("public_url", "https://segq.example/", "https://segq.example"),
        ("broker_url", "redis://cache:6379/0", "redis://cache:6379/0"),
        ("metrics_port", "9100", 9100),
    ],
)
def test_a_set_variable_is_read_by_its_reader(
    tmp_path: Path, field_name: str, raw: str, value: object
) -> None:
    environ = {"SEGQ_DATA_DIR": str(tmp_path), env_var(field_name).name: raw}
    assert getattr(Settings.from_env(environ), field_name) == value


@pytest.mark.parametrize(
    ("field_name", "raw"),
    [("max_upload_bytes", "-1"), ("metrics_port", "70000"), ("log_format", "xml")],
)
def test_an_unusable_value_is_refused_by_name(tmp_path: Path, field_name: str, raw: str) -> None:
    variable = env_var(field_name).name
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({"SEGQ_DATA_DIR": str(tmp_path), variable: raw})
