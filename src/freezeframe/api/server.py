"""Run the app under uvicorn, refusing to listen beyond loopback in clear text unless told to."""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
from pathlib import Path

import uvicorn

from freezeframe.api.app import ApiConfig, create_app
from freezeframe.errors import InstanceBusy, InvalidRequest

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8774


def is_loopback(host: str) -> bool:
    """Only literal loopback addresses and ``localhost`` count; any other name might resolve elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, tls_cert: Path | None, tls_key: Path | None, insecure_listen: bool) -> None:
    """Bearer tokens cross the network: beyond loopback that needs TLS, or an explicit opt-out."""
    if (tls_cert is None) != (tls_key is None):
        raise InvalidRequest("give both --tls-cert and --tls-key (PEM files), or neither")
    for option, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not path.is_file():
            raise InvalidRequest(f"{option} {path}: no such file")
    if tls_cert is None and not is_loopback(host) and not insecure_listen:
        raise InvalidRequest(
            f"listening on {host} would send bearer tokens in clear text: give --tls-cert and --tls-key, "
            "or --insecure-listen if something in front of the service terminates TLS"
        )


def check_service_lock(home: Path) -> None:
    """Fail with a clear message before uvicorn starts when another service already serves this home."""
    path = home / "service.lock"
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "unknown"
            raise InstanceBusy(
                f"another freezeframe service (pid {holder}) already serves {home}; stop it or use another --home"
            ) from None
    finally:
        os.close(fd)


def serve(
    config: ApiConfig,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    insecure_listen: bool = False,
    log_level: str = "info",
) -> None:
    check_listen(host, tls_cert, tls_key, insecure_listen)
    config.settings.home.mkdir(parents=True, exist_ok=True)
    check_service_lock(config.settings.home)
    logging.getLogger("freezeframe").setLevel(log_level.upper())
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            log_level=log_level,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
