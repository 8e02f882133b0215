"""The Prefect server `dynface restore` starts for itself when none is configured."""

from __future__ import annotations

import socket

import httpx

from app import embedded_prefect


def test_a_server_whose_port_was_taken_is_started_again_on_another(monkeypatch) -> None:
    """A port found free can be taken before uvicorn binds it; the run must not fail for that."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        real = embedded_prefect._free_port
        monkeypatch.setattr(embedded_prefect, "_free_port", lambda: next(ports, None) or real())
        with embedded_prefect.prefect_api() as api_url:
            assert f":{busy}/" not in api_url
            assert httpx.get(f"{api_url}/health", timeout=5).status_code == 200
