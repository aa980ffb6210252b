"""Webhook signing secrets at rest: encrypted with Fernet (``cryptography``).

A stored secret is ``fernet:`` + a Fernet token (AES-128-CBC + HMAC-SHA256), so the
``webhook_subscriptions.secret`` column never holds a plaintext secret. The keys come
from ``TRACKSTREAM_WEBHOOK_KEYS`` (comma-separated) or ``TRACKSTREAM_WEBHOOK_KEY_FILE``
(one a line), newest first: the first key encrypts, every key decrypts
(:class:`~cryptography.fernet.MultiFernet`). Rotation: put a new key first, run
``trackstream webhook rotate-key`` (re-encrypts every secret with it, and encrypts any
plaintext secret left from before encryption), then drop the old key.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

PREFIX = "fernet:"


class SecretKeyError(ValueError):
    """No key, a malformed key, or a secret no configured key opens; names the setting."""


def new_key() -> str:
    return Fernet.generate_key().decode()


class SecretBox:
    def __init__(self, keys: Sequence[str]) -> None:
        fernets = []
        for i, key in enumerate(keys):
            try:
                fernets.append(Fernet(key.encode()))
            except (ValueError, TypeError):
                raise SecretKeyError(
                    f"webhook_keys: key {i + 1} is not a Fernet key "
                    "(32 url-safe base64 bytes; make one with `trackstream webhook new-key`)"
                ) from None
        self._multi = MultiFernet(fernets) if fernets else None

    @property
    def has_key(self) -> bool:
        return self._multi is not None

    def _need(self) -> MultiFernet:
        if self._multi is None:
            raise SecretKeyError(
                "webhook_keys: no key configured (TRACKSTREAM_WEBHOOK_KEYS or "
                "TRACKSTREAM_WEBHOOK_KEY_FILE); make one with `trackstream webhook new-key`"
            )
        return self._multi

    def seal(self, secret: str) -> str:
        return PREFIX + self._need().encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        """The secret; a legacy plaintext one (``whsec_``) as it is."""
        if not stored.startswith(PREFIX):
            return stored
        try:
            return self._need().decrypt(stored[len(PREFIX) :].encode()).decode()
        except InvalidToken:
            raise SecretKeyError(
                "webhook_keys: no configured key decrypts a stored webhook secret "
                "(was the key that encrypted it removed?)"
            ) from None

    def rotate(self, stored: str) -> str:
        """``stored`` encrypted with the newest key (plaintext ones encrypted too)."""
        if not stored.startswith(PREFIX):
            return self.seal(stored)
        try:
            return PREFIX + self._need().rotate(stored[len(PREFIX) :].encode()).decode()
        except InvalidToken:
            raise SecretKeyError(
                "webhook_keys: no configured key decrypts a stored webhook secret"
            ) from None
