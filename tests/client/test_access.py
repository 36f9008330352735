"""Issue 14, daemon access: a lock that is simple to turn on, a page that still works, and an
audit key that a headless server creates for itself."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import keyring
import pytest
from pydantic import SecretStr

from client.daemon import create_app
from tandem_core.server import ServerThread
from tests.client.daemon_fakes import fake_services
from tests.client.test_secrets import BrokenKeyring

KEY = "k3y-0123456789abcdef"


@pytest.fixture()
def locked_url(tmp_path: Path) -> Iterator[str]:
    server = ServerThread(create_app(fake_services(tmp_path, api_key=SecretStr(KEY))))
    yield server.start()
    server.stop()


@pytest.fixture()
def no_keyring() -> Iterator[None]:
    previous = keyring.get_keyring()
    keyring.set_keyring(BrokenKeyring())
    yield
    keyring.set_keyring(previous)


def test_a_locked_daemon_answers_nothing_without_the_key(locked_url: str) -> None:
    for path in ("/v1/documents", "/v1/models", "/metrics", "/v1/egress/x"):
        reply = httpx.get(f"{locked_url}{path}")
        assert reply.status_code == 401, path
        assert "locked" in reply.json()["error"]["message"]
    upload = httpx.post(f"{locked_url}/v1/documents", files={"file": ("a.txt", b"secret")})
    assert upload.status_code == 401
    wrong = httpx.get(f"{locked_url}/v1/documents", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = httpx.get(f"{locked_url}/v1/documents", headers={"authorization": f"Bearer {KEY}"})
    assert right.status_code == 200
    assert httpx.get(f"{locked_url}/health").status_code == 200
    assert httpx.get(f"{locked_url}/").status_code == 200  # the page itself holds no data
    assert httpx.get(f"{locked_url}/v1/session").json() == {"locked": True, "authenticated": False}


def test_login_gives_an_httponly_same_site_session_cookie(locked_url: str) -> None:
    with httpx.Client(base_url=locked_url) as browser:
        refused = browser.post("/login", json={"key": "wrong"})
        assert refused.status_code == 401 and "tandem_session" not in browser.cookies
        reply = browser.post("/login", json={"key": KEY})
        assert reply.status_code == 200
        cookie = reply.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert KEY not in reply.headers["set-cookie"]
        assert browser.get("/v1/documents").status_code == 200
        assert browser.get("/v1/session").json() == {"locked": True, "authenticated": True}
        browser.post("/logout")
        assert browser.get("/v1/documents").status_code == 401
    form = httpx.post(f"{locked_url}/login", data={"key": KEY})
    assert form.status_code == 200 and "tandem_session" in form.cookies


def test_an_open_daemon_says_so(tmp_path: Path) -> None:
    server = ServerThread(create_app(fake_services(tmp_path)))
    url = server.start()
    try:
        assert httpx.get(f"{url}/v1/documents").status_code == 200
        assert httpx.get(f"{url}/v1/session").json() == {"locked": False, "authenticated": True}
    finally:
        server.stop()


def test_serve_states_whether_access_is_open(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli_daemon import access_line, api_key_for
    from client.settings import ClientSettings, DaemonSettings

    settings = ClientSettings(daemon=DaemonSettings(data_dir=tmp_path / "data"))
    assert api_key_for("127.0.0.1", settings) is None
    assert access_line(None, settings).startswith("access: OPEN")
    locked = ClientSettings(daemon=DaemonSettings(data_dir=tmp_path / "data",
                                                  require_api_key=True))
    key = api_key_for("127.0.0.1", locked)
    assert key is not None and len(key.get_secret_value()) == 64
    assert "created the daemon's API key in the keyring" in capsys.readouterr().err
    assert api_key_for("127.0.0.1", locked) == key  # kept, not made again
    assert access_line(key, locked).startswith("access: LOCKED")


def test_headless_first_start_creates_the_audit_key_in_a_private_file(
        tmp_path: Path, no_keyring: None, capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli_daemon import api_key_for, audit_key
    from client.secrets import SecretStore
    from client.settings import ClientSettings, DaemonSettings

    settings = ClientSettings(daemon=DaemonSettings(data_dir=tmp_path / "data"))
    key = audit_key(settings)
    path = tmp_path / "data" / "secrets" / "audit-hmac.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    message = capsys.readouterr().err
    assert str(path) in message and "tandem keys set audit-hmac" in message
    assert "TANDEM_AUDIT_HMAC_KEY" in message
    assert audit_key(settings) == key and capsys.readouterr().err == ""  # read back, not remade
    store = SecretStore(files_dir=tmp_path / "data" / "secrets")
    assert store.status("audit-hmac").where() == f"the file {path}"
    os.chmod(path, 0o644)
    with pytest.raises(Exception, match="chmod 600"):
        store.get("audit-hmac")
    os.chmod(path, 0o600)
    locked = ClientSettings(daemon=DaemonSettings(data_dir=tmp_path / "data", require_api_key=True))
    assert api_key_for("127.0.0.1", locked) is not None
    assert (tmp_path / "data" / "secrets" / "daemon-api.key").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tandem_serve_on_a_headless_server_first_start(toy_pair: object, tmp_path: Path) -> None:
    """The real `tandem serve --lock` with no keyring: it starts, creates both keys in 0600 files,
    says where, says that access is locked, and answers only with the key."""
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    config = tmp_path / "client.toml"
    config.write_text(f'[base]\npreset = "path"\npath = "{toy_pair.base_gguf}"\nn_ctx = 512\n'  # type: ignore[attr-defined]
                      f'[daemon]\ndata_dir = "{data}"\n')
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
           "TANDEM_POLICY_USAGE_DB": str(data / "usage.sqlite3"),
           "TANDEM_POLICY_AUDIT_LOG": str(data / "audit" / "audit.jsonl")}
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", "from client.cli import main; raise SystemExit(main())",
         "serve", "--config", str(config), "--port", str(port), "--lock"],
        cwd=Path(__file__).resolve().parents[2], env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        assert server.stderr is not None
        while not any("serving" in line for line in lines):
            line = server.stderr.readline()
            assert line or server.poll() is None, "".join(lines)
            lines.append(line)
        startup = "".join(lines)
        audit_file, api_file = data / "secrets" / "audit-hmac.key", data / "secrets" / "daemon-api.key"
        assert f"created the audit log's HMAC key in {audit_file} (mode 0600" in startup
        assert "tandem keys set audit-hmac" in startup and "TANDEM_AUDIT_HMAC_KEY" in startup
        assert f"created the daemon's API key in the file {api_file}" in startup
        assert "access: LOCKED" in startup
        for path in (audit_file, api_file):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = api_file.read_text().strip()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                refused = httpx.get(f"{url}/v1/documents")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert refused.status_code == 401
        allowed = httpx.get(f"{url}/v1/documents", headers={"authorization": f"Bearer {key}"})
        assert allowed.status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()
