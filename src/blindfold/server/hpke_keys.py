"""The server's HPKE key configuration for Oblivious HTTP (RFC 9458 section 3): X25519,
HKDF-SHA256, AES-128-GCM, under a one-byte key id.

The private keys are made inside the TEE and live only in process memory. The current key is
replaced on a schedule (`rotation_seconds`); the one it replaces is still accepted for
`grace_seconds`, so that a client that attested just before the rotation is not refused
mid-request. Both are named in the identity document the evidence binds
(`attestation.binding.identity_document`), so the set of keys a client may encrypt to is
always one the TEE vouched for.

Kept apart from the TLS identity (`server.identity`) so that a service identity shared by
replicas can carry a keyring as one object.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyhpke import KEMKeyInterface

from blindfold import ohttp

DEFAULT_ROTATION_SECONDS = 24 * 3600.0
DEFAULT_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class HpkeKey:
    config: ohttp.KeyConfig
    private_key: KEMKeyInterface
    created: float


class HpkeKeyring:
    def __init__(
        self,
        rotation_seconds: float = DEFAULT_ROTATION_SECONDS,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if rotation_seconds <= 0 or grace_seconds < 0:
            raise ValueError("HPKE rotation needs a positive period and a non-negative grace")
        self.rotation_seconds = rotation_seconds
        self.grace_seconds = grace_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._current = self._new_key(secrets.randbelow(256))
        self._previous: HpkeKey | None = None
        self._previous_until = 0.0

    def _new_key(self, key_id: int) -> HpkeKey:
        pair = ohttp.SUITE.kem.derive_key_pair(secrets.token_bytes(32))
        public = pair.public_key.to_public_bytes()
        return HpkeKey(ohttp.KeyConfig(key_id, public), pair.private_key, self._clock())

    def rotate(self, now: float | None = None) -> None:
        """Makes a new current key; the old one is accepted for the grace period."""
        with self._lock:
            now = self._clock() if now is None else now
            self._previous = self._current
            self._previous_until = now + self.grace_seconds
            self._current = self._new_key((self._current.config.key_id + 1) % 256)

    def _maintain(self) -> None:
        now = self._clock()
        if now - self._current.created >= self.rotation_seconds:
            self.rotate(now)
        with self._lock:
            if self._previous is not None and now >= self._previous_until:
                self._previous = None

    def configs(self) -> list[ohttp.KeyConfig]:
        """The configurations accepted now, current first (rotating first when due)."""
        self._maintain()
        with self._lock:
            keys = [self._current] + ([self._previous] if self._previous is not None else [])
        return [key.config for key in keys]

    def private_key(self, key_id: int) -> KEMKeyInterface:
        """The private key for `key_id`, or UnknownKeyError when it is not (or no longer) held."""
        self._maintain()
        with self._lock:
            for key in (self._current, self._previous):
                if key is not None and key.config.key_id == key_id:
                    return key.private_key
            current = self._current.config.key_id
        raise ohttp.UnknownKeyError(
            f"this gateway holds no HPKE key {key_id} (its current key is {current}): the key "
            "was rotated away, or the request was encrypted for another server. Fetch "
            "/v2/attestation?binding=identity again and use the key configuration it binds."
        )
