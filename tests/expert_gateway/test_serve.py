"""`tandem gateway serve` as a real process: settings file, --port, TLS, and auth on by default."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from expert_gateway.keys import KeyStore


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _serving(config: Path, port: int, *, scheme: str, verify: bool | ssl.SSLContext) -> Iterator[str]:
    log = (config.parent / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "gateway", "serve", "--config", str(config),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", verify=verify, timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.communicate()
                log.close()
                errors = (config.parent / "gateway.log").read_text(errors="replace")
                pytest.fail(f"gateway did not start: {errors[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=20)
        if process.poll() is None:
            process.kill()
            process.communicate()
        log.close()


def _config(tmp_path: Path, expert_gguf: Path, extra: str = "") -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[model]\npreset = "path"\npath = "{expert_gguf}"\n'
        f'[llama_cpp]\nn_ctx = 1024\nslots = 1\nn_threads = 1\n'
        f'[auth]\nkeys_file = "{tmp_path / "keys.json"}"\n{extra}'
    )
    return config


def test_serve_from_a_config_file_with_auth_and_a_content_free_log(tmp_path: Path,
                                                                    expert_gguf: Path) -> None:
    _, secret = KeyStore(tmp_path / "keys.json").add("cli")
    headers = {"Authorization": f"Bearer {secret}"}
    with _serving(_config(tmp_path, expert_gguf, '[server]\nlog_level = "debug"\n'), _free_port(),
                  scheme="http", verify=True) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers=headers).json()
        info = models[0]
        reply = httpx.post(url + "/v1/continue", headers=headers, timeout=60, json={
            "session": "log", "model": info["name"], "held": 0, "tokens": [101, 102, 103, 104],
            "max_tokens": 2, "tokenizer": info["tokenizer"]})
        assert reply.status_code == 200
    assert info["name"] == "toy-expert"
    log = (tmp_path / "gateway.log").read_text(errors="replace")
    assert "POST /v1/continue" in log  # the access log is on, at debug level even
    assert secret not in log and "101, 102" not in log and "[101,102" not in log


def test_serve_over_tls(tmp_path: Path, expert_gguf: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tls = f'[server]\ntls_certfile = "{cert}"\ntls_keyfile = "{key}"\n'
    _, secret = KeyStore(tmp_path / "keys.json").add("tls")
    trust = ssl.create_default_context(cafile=str(cert))
    with _serving(_config(tmp_path, expert_gguf, tls), _free_port(), scheme="https", verify=trust) as url:
        response = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {secret}"},
                             verify=trust)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http") + "/health", timeout=5)
    assert response.status_code == 200


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[auth]\nenabled = false\n[server]\nhost = '0.0.0.0'\n")
    result = subprocess.run([sys.executable, "-m", "client.cli", "gateway", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "loopback" in result.stderr and "Traceback" not in result.stderr
