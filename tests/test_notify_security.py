"""The notify stage's guards: where it may send (SSRF), secrets encrypted at rest
(the column holds no plaintext), URLs shown without credentials or tokens."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from ops.cli import app as cli_app
from processors import ssrf
from processors.database import Database
from schemas import webhook_store
from schemas.db import upgrade
from schemas.secretbox import SecretBox, SecretKeyError, new_key
from tests.webhook_support import make_secret

KEY = "q6Hq2F1l9cZkzM3-Yk2Zq1lq3zH2kR8cQwN8bX2mV0E="

# (url, refused without flags: the flag named, allowed with)
SSRF_TABLE = [
    ("http://93.184.215.14/h", "--allow-http", {"allow_http": True}),
    ("https://127.0.0.1/h", "--allow-private", {"allow_private": True}),
    ("https://127.8.9.10:8443/h", "--allow-private", {"allow_private": True}),
    ("https://[::1]/h", "--allow-private", {"allow_private": True}),
    ("https://localhost/h", "--allow-private", {"allow_private": True}),
    ("https://10.1.2.3/h", "--allow-private", {"allow_private": True}),
    ("https://172.16.0.1/h", "--allow-private", {"allow_private": True}),
    ("https://192.168.1.1/h", "--allow-private", {"allow_private": True}),
    ("https://[fd00::1]/h", "--allow-private", {"allow_private": True}),
    ("https://169.254.169.254/latest/meta-data", "--allow-private", {"allow_private": True}),
    ("https://[fe80::1]/h", "--allow-private", {"allow_private": True}),
    ("https://0.0.0.0/h", "--allow-private", {"allow_private": True}),
    ("https://[::]/h", "--allow-private", {"allow_private": True}),
    ("https://[::ffff:127.0.0.1]/h", "--allow-private", {"allow_private": True}),
    ("https://100.64.0.1/h", "--allow-private", {"allow_private": True}),
    ("http://127.0.0.1:8080/h", "--allow-http", {"allow_private": True, "allow_http": True}),
]


@pytest.mark.parametrize(("url", "flag", "allow"), SSRF_TABLE)
def test_ssrf_guard_refuses_unless_the_flag_allows(url: str, flag: str, allow: Any) -> None:
    with pytest.raises(ssrf.Refused) as refused:
        ssrf.check_url(url)
    assert flag in str(refused.value)
    ssrf.check_url(url, **allow)


def test_a_public_https_address_is_allowed() -> None:
    ssrf.check_url("https://93.184.215.14/hooks")
    ssrf.check_url("https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/hooks")


async def test_the_address_is_checked_again_at_send_time(monkeypatch) -> None:
    """DNS rebinding: public when first resolved, loopback later: refused then, and
    the request is pinned to the address that was checked."""
    answers = iter(["93.184.215.14", "127.0.0.1"])

    async def fake(host: str, port: int, **kw: Any) -> list[Any]:
        ip = next(answers)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    import asyncio

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake)
    resolver = ssrf.Resolver(ttl_s=0)
    first = await resolver.target("https://hooks.example/h", allow_private=False, allow_http=False)
    assert first == ssrf.Target("93.184.215.14", "hooks.example")
    with pytest.raises(ssrf.Refused, match="loopback"):
        await resolver.target("https://hooks.example/h", allow_private=False, allow_http=False)


def test_categories() -> None:
    cat = {ip: ssrf.category(ipaddress.ip_address(ip)) for ip in ("8.8.8.8", "169.254.1.1")}
    assert cat == {"8.8.8.8": None, "169.254.1.1": "link-local"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@hooks.example/h?token=s3cr3t", "https://hooks.example/h?..."),
        ("https://hooks.example:8443/a/b#frag", "https://hooks.example:8443/a/b"),
        ("http://[::1]:9/h?x=1", "http://[::1]:9/h?..."),
    ],
)
def test_urls_are_shown_without_credentials_or_query(url: str, shown: str) -> None:
    assert webhook_store.redact_url(url) == shown


def test_origin_is_scheme_host_and_port() -> None:
    o = webhook_store.origin
    assert o("https://A.example/x?y") == o("https://a.example:443/other") == "https://a.example:443"
    assert o("http://a.example/") != o("https://a.example/")


def test_secrets_are_encrypted_at_rest_and_rotated(tmp_path) -> None:
    db_url = f"sqlite:///{tmp_path}/s.db"
    upgrade(db_url)
    db = Database(db_url)
    secret = make_secret(4)
    old = SecretBox([KEY])
    try:
        sid = db.run_sync(
            webhook_store.add_subscription, "https://93.184.215.14/h", secret, box=old
        )
        raw = db.run_sync(
            lambda s: s.execute(text("SELECT secret FROM webhook_subscriptions")).scalar_one()
        )
        assert raw.startswith("fernet:")
        assert secret not in raw and secret[6:] not in raw and secret[6:30] not in raw
        assert db.run_sync(webhook_store.subscription, sid, old).secret == secret
        with pytest.raises(SecretKeyError, match="webhook_keys"):
            db.run_sync(webhook_store.subscription, sid, SecretBox([new_key()]))
        with pytest.raises(SecretKeyError, match="no key configured"):
            db.run_sync(webhook_store.subscription, sid, SecretBox([]))

        # rotation: the new key first, rotate, then the old key can go
        fresh = new_key()
        assert db.run_sync(webhook_store.rotate_secrets, SecretBox([fresh, KEY])) == 1
        assert db.run_sync(webhook_store.subscription, sid, SecretBox([fresh])).secret == secret
        # a secret stored before encryption (plain text) is encrypted by the rotation
        db.run_sync(
            lambda s: s.execute(text("UPDATE webhook_subscriptions SET secret = :s"), {"s": secret})
        )
        db.run_sync(webhook_store.rotate_secrets, SecretBox([fresh]))
        raw = db.run_sync(
            lambda s: s.execute(text("SELECT secret FROM webhook_subscriptions")).scalar_one()
        )
        assert raw.startswith("fernet:") and secret[6:] not in raw
    finally:
        db.dispose()


def test_bad_keys_name_the_setting() -> None:
    with pytest.raises(SecretKeyError, match="webhook_keys: key 2"):
        SecretBox([KEY, "not-a-key"])


def cli(db_url: str, *args: str, keys: str = KEY) -> Any:
    env = {"TRACKSTREAM_WEBHOOK_KEYS": keys}
    return CliRunner().invoke(cli_app, ["--database-url", db_url, *args], env=env)


def test_webhook_add_refuses_and_explains(tmp_path) -> None:
    db_url = f"sqlite:///{tmp_path}/c.db"
    upgrade(db_url)
    secret_file = tmp_path / "s.secret"
    secret_file.write_text(make_secret(1))
    add = ("webhook", "add")
    meta = cli(db_url, *add, "https://169.254.169.254/latest", "--secret-file", str(secret_file))
    assert meta.exit_code == 2 and "link-local" in meta.output and "--allow-private" in meta.output
    plain = cli(db_url, *add, "http://93.184.215.14/h", "--secret-file", str(secret_file))
    assert plain.exit_code == 2 and "--allow-http" in plain.output
    nokey = cli(db_url, *add, "https://93.184.215.14/h", "--secret-file", str(secret_file), keys="")
    assert nokey.exit_code == 2 and "webhook_keys" in nokey.output
    ok = cli(
        db_url, *add, "https://u:pw@93.184.215.14/h?token=t0k", "--secret-file", str(secret_file)
    )
    assert ok.exit_code == 0, ok.output
    listed = cli(db_url, "webhook", "list", "--json")
    rows = json.loads(listed.output)
    assert rows[0]["url"] == "https://93.184.215.14/h?..."
    for out in (ok.output, listed.output, cli(db_url, "webhook", "list").output):
        assert "pw" not in out and "t0k" not in out
    rotated = cli(db_url, "webhook", "rotate-key", keys=f"{new_key()},{KEY}")
    assert rotated.exit_code == 0 and "re-encrypted 1" in rotated.output
