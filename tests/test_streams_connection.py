"""The connection factory against real servers: TLS (``rediss://``) and an ACL user
with a password. A refused login names the URL without its password."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from streams.connection import connect
from streams.errors import RedisUnavailable
from streams.message import Codec
from streams.producer import Producer, Route
from streams.worker import Worker
from tests.conftest import RedisTarget, unavailable
from tests.servers import free_port
from tests.support import Ping, fast_settings


def make_certs(root: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl (to make test certificates)", FileNotFoundError("not on PATH"))
    ca, ca_key = root / "ca.crt", root / "ca.key"
    cert, key, csr = root / "server.crt", root / "server.key", root / "server.csr"
    ext = root / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=trackstream test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ]  # fmt: skip
    for args in steps:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


async def run_through(url: str, prefix: str) -> int:
    """Publish 20 entries and drain them with a worker; returns how many were handled."""
    settings = fast_settings(RedisTarget(url, False), prefix, connect_retries=0)
    client = connect(settings)
    codec = Codec([Ping])
    route = Route(prefix, "work")
    try:
        await Producer(client, codec, url).publish(route, [Ping(n=n) for n in range(20)])
        seen: set[int] = set()

        async def handle(msg, ctx):  # type: ignore[no-untyped-def]
            seen.add(msg.payload.n)

        await Worker(client, settings, route, codec, handler=handle).run(burst=True)
        return len(seen)
    finally:
        await client.aclose()


async def test_rediss_url_connects_over_tls(redis_factory, tmp_path, unique_prefix):
    ca, cert, key = make_certs(tmp_path)
    tls_port = free_port()
    redis_factory(
        extra=["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
               "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
               "--tls-auth-clients", "no"]
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"
    assert await run_through(url, unique_prefix) == 20


async def test_acl_user_and_password_in_the_url(redis_factory, unique_prefix):
    server = redis_factory(
        extra=["--user", "default", "off", "--user", "pipeline", "on", ">s3cret-pw",
               "~*", "&*", "+@all"]
    )  # fmt: skip
    good = f"redis://pipeline:s3cret-pw@127.0.0.1:{server.port}/0"
    assert await run_through(good, unique_prefix) == 20

    bad = f"redis://pipeline:wrong-pw@127.0.0.1:{server.port}/0"
    with pytest.raises(RedisUnavailable) as info:
        await run_through(bad, unique_prefix)
    assert "wrong-pw" not in str(info.value) and "pipeline:***@127.0.0.1" in str(info.value)
