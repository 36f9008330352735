"""Gateway settings (gateway.toml + env), the error tree's HTTP mapping, the metrics text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.exceptions import RequestValidationError

import expert_gateway.errors as errors
from expert_gateway.backends import BACKENDS
from expert_gateway.metrics import GatewayMetrics
from expert_gateway.settings import GatewaySettings, load_gateway_settings
from tandem_core.errors import ConfigError
from tandem_core.protocol import ERROR_TYPES

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "gateway.toml"


def test_the_shipped_config_holds_the_defaults() -> None:
    assert load_gateway_settings(CONFIG).model_dump() == GatewaySettings().model_dump()


def test_every_field_is_described() -> None:
    for section in GatewaySettings.model_fields.values():
        model = section.annotation
        for name, field in model.model_fields.items():  # type: ignore[union-attr]
            assert field.description, f"{model.__name__}.{name} has no description"


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_GATEWAY_SERVER__PORT", "9123")
    monkeypatch.setenv("TANDEM_GATEWAY_AUTH__KEY_HASHES", json.dumps(["ab" * 32]))
    settings = load_gateway_settings(CONFIG)
    assert settings.server.port == 9123
    assert settings.auth.key_hashes == ["ab" * 32]


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[server]\nprot = 1\n", "prot"),
        ("[server]\nport = 70000\n", "port"),
        ("[auth]\nenabled = false\n[server]\nhost = '0.0.0.0'\n", "loopback"),
        ("[model]\nbackend = 'vllm'\n", "backend"),
        ("[model]\npreset = 'path'\n", "path"),
        ("[server]\ntls_certfile = 'c.pem'\n", "tls"),
        ("[auth]\nkey_hashes = ['not-hex']\n", "SHA-256"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path: Path, toml: str, fragment: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=fragment):
        load_gateway_settings(path)


def test_backend_registry_names_every_choice() -> None:
    assert set(BACKENDS) == {"llama_cpp", "hf", "openai_compat"}


def test_every_gateway_error_maps_to_its_status_and_type() -> None:
    classes = [value for value in vars(errors).values()
               if isinstance(value, type) and issubclass(value, errors.GatewayError)]
    classes += errors.SHARED_ERRORS  # defined in client.errors, answered by the gateway
    assert len(classes) >= 12
    for error_class in classes:
        if error_class is errors.RateLimitedError:
            exc: Exception = error_class("slow down", retry_after=2.5)
        else:
            exc = error_class("boom")
        response = errors.response_for(exc)
        expected = errors.SHARED_ERRORS.get(error_class) or error_class.status_code
        assert response.status_code == expected
        body = json.loads(bytes(response.body))
        assert body["error"]["message"] == ("slow down" if error_class is errors.RateLimitedError else "boom")
        if response.status_code in ERROR_TYPES:
            assert body["error"]["type"] == ERROR_TYPES[response.status_code]
    limited = errors.response_for(errors.RateLimitedError("x", retry_after=2.5))
    assert limited.headers["Retry-After"] == "3"


def test_validation_errors_are_422_without_echoing_values() -> None:
    exc = RequestValidationError([{"loc": ("body", "tokens", 0), "msg": "too big", "type": "x",
                                   "input": 123456789}])
    response = errors.response_for(exc)
    assert response.status_code == 422
    assert "123456789" not in bytes(response.body).decode()


def test_unexpected_exceptions_are_a_content_free_500() -> None:
    response = errors.response_for(RuntimeError("secret token 42"))
    assert response.status_code == 500
    assert "42" not in bytes(response.body).decode()


def test_metrics_text_is_prometheus_exposition() -> None:
    metrics = GatewayMetrics(active_sessions=lambda: 3, held_tokens=lambda: 70)
    metrics.requests.inc(route="/v1/continue", status="200")
    metrics.latency.observe(0.02, route="/v1/continue")
    metrics.latency.observe(50.0, route="/v1/continue")
    text = metrics.render()
    assert 'tandem_gateway_requests_total{route="/v1/continue",status="200"} 1' in text
    assert 'tandem_gateway_request_duration_seconds_bucket{le="0.025",route="/v1/continue"} 1' in text
    assert 'tandem_gateway_request_duration_seconds_bucket{le="+Inf",route="/v1/continue"} 2' in text
    assert "tandem_gateway_active_sessions 3" in text
    for line in text.strip().splitlines():
        assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? [-+0-9.e]+$", line), line
