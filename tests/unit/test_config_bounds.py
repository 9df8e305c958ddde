"""Settings that would quietly disable a limit, hang the server or crash with a traceback
are refused with a ConfigError naming the variable (review findings 7-9)."""

from __future__ import annotations

import os

import pytest

from service.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FACEGATE_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_client_concurrency_limit_must_be_positive(
    monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    # 0 would remove the client's cap, a negative one block it for good.
    monkeypatch.setenv("FACEGATE_CLIENT_CONCURRENCY", f'{{"CN=batch": {limit}}}')
    with pytest.raises(ConfigError, match="FACEGATE_CLIENT_CONCURRENCY") as info:
        load_settings()
    assert "CN=batch" in str(info.value) and "greater than 0" in str(info.value)


def test_a_positive_client_concurrency_limit_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEGATE_CLIENT_CONCURRENCY", '{"CN=batch": 2}')
    assert load_settings().client_concurrency == {"CN=batch": 2}


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("FACEGATE_CLIENT_CONCURRENCY", "CN=batch:2", "JSON object"),
        ("FACEGATE_TLS_CLIENT_ALLOWED", "CN=batch,O=acme", "JSON list"),
    ],
)
def test_a_setting_that_is_not_json_names_the_variable_and_the_form(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name) as info:
        load_settings()
    assert expected in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no traceback chain


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FACEGATE_MAX_BATCH_DELAY_MS", "inf"),
        ("FACEGATE_MAX_BATCH_DELAY_MS", "nan"),
        ("FACEGATE_MAX_BATCH_DELAY_MS", "60000"),
        ("FACEGATE_INDEX_WATCH_SECONDS", "1e-9"),
        ("FACEGATE_INDEX_WATCH_SECONDS", "inf"),
        ("FACEGATE_INDEX_WATCH_SECONDS", "nan"),
        ("FACEGATE_GRACE_SECONDS", "inf"),
        ("FACEGATE_GRACE_SECONDS", "1e9"),
        ("FACEGATE_MAX_REQUEST_SECONDS", "inf"),
        ("FACEGATE_MAX_REQUEST_SECONDS", "nan"),
    ],
)
def test_durations_are_finite_and_bounded(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


@pytest.mark.parametrize("value", ["0", "0.1", "10", "3600"])
def test_the_index_watch_is_off_or_at_least_a_tenth_of_a_second(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FACEGATE_INDEX_WATCH_SECONDS", value)
    assert load_settings().index_watch_seconds == float(value)
