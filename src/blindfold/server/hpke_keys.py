"""The server's HPKE key configuration for Oblivious HTTP (RFC 9458 section 3): X25519,
HKDF-SHA256, AES-128-GCM, under a one-byte key id.

The private keys are derived inside the TEE from a secret seed (the service identity's, so
replicas agree) and live only in process memory. The current key is replaced on a schedule
(`rotation_seconds`, periods counted from the epoch); the one it replaces is still accepted
for `grace_seconds`, so that a client that attested just before the rotation is not refused
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

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindfold import hpke, ohttp

DEFAULT_ROTATION_SECONDS = 24 * 3600.0
DEFAULT_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class HpkeKey:
    config: ohttp.KeyConfig
    private_key: hpke.KeyPair


class HpkeKeyring:
    """The gateway's keys: one per rotation period, derived from `seed` and the period's
    number, so that replicas sharing a seed (the service identity's) hold the same keys and
    rotate at the same moments (clocks agreeing within the grace period). The key of the
    period that just ended is still accepted for `grace_seconds`."""

    def __init__(
        self,
        rotation_seconds: float = DEFAULT_ROTATION_SECONDS,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        clock: Callable[[], float] = time.time,
        seed: bytes | None = None,
    ) -> None:
        if rotation_seconds <= 0 or grace_seconds < 0:
            raise ValueError("HPKE rotation needs a positive period and a non-negative grace")
        self.rotation_seconds = rotation_seconds
        self.grace_seconds = grace_seconds
        self._clock = clock
        self._seed = seed if seed is not None else secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._keys: dict[int, HpkeKey] = {}  # by period number: the current and previous

    def _key(self, period: int) -> HpkeKey:
        with self._lock:
            key = self._keys.get(period)
            if key is None:
                material = HKDF(
                    algorithm=hashes.SHA256(),
                    length=32,
                    salt=None,
                    info=b"blindfold ohttp key " + period.to_bytes(8, "big", signed=True),
                ).derive(self._seed)
                pair = hpke.KeyPair.derive(material)
                key = HpkeKey(ohttp.KeyConfig(period % 256, pair.public_key), pair)
                self._keys = {p: k for p, k in self._keys.items() if p >= period - 1}
                self._keys[period] = key
            return key

    def _periods(self) -> list[int]:
        """The periods whose keys are accepted now, current first."""
        now = self._clock()
        current = int(now // self.rotation_seconds)
        if now - current * self.rotation_seconds < self.grace_seconds:
            return [current, current - 1]
        return [current]

    def configs(self) -> list[ohttp.KeyConfig]:
        """The configurations accepted now, current first."""
        return [self._key(period).config for period in self._periods()]

    def private_key(self, key_id: int) -> hpke.KeyPair:
        """The key pair for `key_id`, or UnknownKeyError when it is not (or no longer) held."""
        periods = self._periods()
        for period in periods:
            key = self._key(period)
            if key.config.key_id == key_id:
                return key.private_key
        current = self._key(periods[0]).config.key_id
        raise ohttp.UnknownKeyError(
            f"this gateway holds no HPKE key {key_id} (its current key is {current}): the key "
            "was rotated away, or the request was encrypted for another server. Fetch "
            "/v2/attestation?binding=identity again and use the key configuration it binds."
        )
