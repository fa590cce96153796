import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from stream_app.settings import Settings


def test_env_prefix_and_types(monkeypatch):
    monkeypatch.setenv("STREAM_APP_BROKER", "kafka://10.0.0.1:9093;kafka://10.0.0.2:9093")
    monkeypatch.setenv("STREAM_APP_TOPIC_PARTITIONS", "8")
    monkeypatch.setenv("STREAM_APP_PROCESSING_GUARANTEE", "exactly_once")
    s = Settings()
    assert s.bootstrap_servers == "10.0.0.1:9093,10.0.0.2:9093"
    assert s.topic_partitions == 8
    assert s.processing_guarantee == "exactly_once"


def test_safe_defaults():
    s = Settings()
    assert s.web_bind == "127.0.0.1"
    assert s.topic_replication == 0  # the production default: 3, capped by the cluster's brokers
    assert s.log_format == "text"


def test_every_setting_is_read_somewhere():
    """A setting nothing reads is a lie to the operator who sets it (STREAM_APP_STORE and
    STREAM_APP_TABLE_VIEWS were such: removed)."""
    root = Path(__file__).parents[2] / "stream_app"
    code = "\n".join(p.read_text() for p in root.rglob("*.py"))  # settings.py too: topic_layout reads some
    unread = [name for name in Settings.model_fields if not re.search(rf"\.{name}\b", code)]
    assert unread == []
    assert "store" not in Settings.model_fields and "table_views" not in Settings.model_fields


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("STREAM_APP_BROKER", "127.0.0.1:9092"),
        ("STREAM_APP_PROCESSING_GUARANTEE", "twice"),
        ("STREAM_APP_WEB_PORT", "0"),
    ],
)
def test_bad_values_name_the_setting(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as err:
        Settings()
    assert var.removeprefix("STREAM_APP_").lower() in str(err.value)


def test_secrets_never_print(monkeypatch):
    monkeypatch.setenv("STREAM_APP_BROKER_PASSWORD", "hunter2-secret")
    s = Settings()
    assert s.broker_password.get_secret_value() == "hunter2-secret"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in s.model_dump_json()
