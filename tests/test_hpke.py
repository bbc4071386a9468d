"""HPKE base mode (blindfold.hpke) against RFC 9180 Appendix A.1 (DHKEM(X25519,
HKDF-SHA256), HKDF-SHA256, AES-128-GCM): every published intermediate value, the encryptions
with their sequence numbers, and the exported values. A round trip alone would also pass for
code that derives the wrong keys consistently on both sides."""

from __future__ import annotations

import pytest

from blindfold import hpke
from blindfold.server.hpke_keys import HpkeKeyring

INFO = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")
IKM_E = bytes.fromhex("7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234")
PK_EM = bytes.fromhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431")
SK_EM = bytes.fromhex("52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736")
IKM_R = bytes.fromhex("6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037")
PK_RM = bytes.fromhex("3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d")
SK_RM = bytes.fromhex("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8")
SHARED_SECRET = bytes.fromhex("fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc")
KEY_SCHEDULE_CONTEXT = bytes.fromhex(
    "00725611c9d98c07c03f60095cd32d400d8347d45ed67097bbad50fc56da742d07"
    "cb6cffde367bb0565ba28bb02c90744a20f5ef37f30523526106f637abb05449"
)
KEY = bytes.fromhex("4531685d41d65f03dc48f6b8302c05b0")
BASE_NONCE = bytes.fromhex("56d890e5accaaf011cff4b7d")
EXPORTER_SECRET = bytes.fromhex("45ff1c2e220db587171952c0592d5f5ebe103f1561a2614e38f2ffd47e99e3f8")
PLAINTEXT = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
# A.1.1.1: (sequence number, aad, ciphertext).
ENCRYPTIONS = [
    (
        0,
        "436f756e742d30",
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
    ),
    (
        1,
        "436f756e742d31",
        "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84",
    ),
    (
        2,
        "436f756e742d32",
        "498dfcabd92e8acedc281e85af1cb4e3e31c7dc394a1ca20e173cb72516491588d96a19ad4a683518973dcc180",
    ),
    (
        4,
        "436f756e742d34",
        "583bd32bc67a5994bb8ceaca813d369bca7b2a42408cddef5e22f880b631215a09fc0012bc69fccaa251c0246d",
    ),
    (
        255,
        "436f756e742d323535",
        "7175db9717964058640a3a11fb9007941a5d1757fda1a6935c805c21af32505bf106deefec4a49ac38d71c9e0a",
    ),
    (
        256,
        "436f756e742d323536",
        "957f9800542b0b8891badb026d79cc54597cb2d225b54c00c5238c25d05c30e3fbeda97d2e0e1aba483a2df9f2",
    ),
]
# A.1.1.2: (exporter context, L = 32, exported value).
EXPORTS = [
    ("", "3853fe2b4035195a573ffc53856e77058e15d9ea064de3e59f4961d0095250ee"),
    ("00", "2e8f0b54673c7029649d4eb9d5e33bf1872cf76d623ff164ac185da9e88c21a5"),
    ("54657374436f6e74657874", "e9e43065102c3836401bed8c3c3c75ae46be1639869391d62c61f1ec7af54931"),
]


def _sender() -> tuple[bytes, hpke.Context]:
    return hpke.setup_sender(PK_RM, INFO, ephemeral=hpke.KeyPair.derive(IKM_E))


def test_derive_key_pair_gives_the_published_keys() -> None:
    ephemeral, recipient = hpke.KeyPair.derive(IKM_E), hpke.KeyPair.derive(IKM_R)
    assert (ephemeral.private_bytes(), ephemeral.public_key) == (SK_EM, PK_EM)
    assert (recipient.private_bytes(), recipient.public_key) == (SK_RM, PK_RM)


def test_both_sides_reach_the_published_key_schedule() -> None:
    assert hpke.key_schedule_context(INFO) == KEY_SCHEDULE_CONTEXT
    enc, sender = _sender()
    recipient = hpke.setup_recipient(enc, hpke.KeyPair.from_private_bytes(SK_RM), INFO)
    assert enc == PK_EM
    assert hpke.Context(SHARED_SECRET, INFO).key == KEY
    for context in (sender, recipient):
        assert (context.key, context.base_nonce) == (KEY, BASE_NONCE)
        assert context.exporter_secret == EXPORTER_SECRET


def test_encryptions_in_sequence_match_the_published_ciphertexts() -> None:
    _, sender = _sender()
    recipient = hpke.setup_recipient(PK_EM, hpke.KeyPair.derive(IKM_R), INFO)
    sequence = 0
    for number, aad, ciphertext in ENCRYPTIONS:
        while sequence < number:  # the vectors skip some sequence numbers
            recipient.open(sender.seal(b"skipped"))
            sequence += 1
        sealed = sender.seal(PLAINTEXT, bytes.fromhex(aad))
        assert sealed.hex() == ciphertext
        assert recipient.open(sealed, bytes.fromhex(aad)) == PLAINTEXT
        sequence += 1


def test_exported_values_match_and_longer_exports_extend_them() -> None:
    _, sender = _sender()
    for context, value in EXPORTS:
        assert sender.export(bytes.fromhex(context), 32).hex() == value
    # Longer than one hash: HKDF-Expand's later blocks (the key schedule never needs them).
    assert len(sender.export(b"", 100)) == 100
    assert sender.export(b"", 100) != sender.export(b"x", 100)
    with pytest.raises(ValueError, match="at most"):
        sender.export(b"", 255 * 32 + 1)


def test_every_sender_context_has_its_own_ephemeral_key() -> None:
    """Requests must not be linkable by their key: each setup makes a fresh pair."""
    recipient = hpke.KeyPair.derive(IKM_R)
    encs = {hpke.setup_sender(recipient.public_key, INFO)[0] for _ in range(50)}
    assert len(encs) == 50
    enc, sender = hpke.setup_sender(recipient.public_key, INFO)
    opened = hpke.setup_recipient(enc, recipient, INFO)
    assert opened.open(sender.seal(b"m", b"a"), b"a") == b"m"
    assert opened.export(b"ctx", 16) == sender.export(b"ctx", 16)


def test_altered_ciphertexts_and_unusable_keys_are_refused() -> None:
    _, sender = _sender()
    sealed = bytearray(sender.seal(PLAINTEXT))
    sealed[0] ^= 1
    recipient = hpke.setup_recipient(PK_EM, hpke.KeyPair.derive(IKM_R), INFO)
    with pytest.raises(hpke.HpkeError, match="tag"):
        recipient.open(bytes(sealed))
    # An all-zero (small-order) public key would make the shared secret all zeros.
    with pytest.raises(hpke.HpkeError, match="small order"):
        hpke.setup_recipient(bytes(32), hpke.KeyPair.derive(IKM_R), INFO)
    with pytest.raises(hpke.HpkeError):
        hpke.setup_sender(bytes(32), INFO)


def test_the_gateways_derived_keys_are_unchanged() -> None:
    """The keyring derives its keys from the service seed; replicas and clients that
    attested before an upgrade must see the same keys after it (values from pyhpke's
    DeriveKeyPair, which derived them before)."""
    keyring = HpkeKeyring(3600, 0, clock=lambda: 5 * 3600 + 10, seed=bytes(range(32)))
    assert [(config.key_id, config.public_key.hex()) for config in keyring.configs()] == [
        (5, "166e4ee42700adf2388858e4eac2863ce9c1f00d12a52e3821c06b4691632050")
    ]
    keyring = HpkeKeyring(3600, 0, clock=lambda: -3 * 3600 + 10, seed=bytes(range(32)))
    assert [(config.key_id, config.public_key.hex()) for config in keyring.configs()] == [
        (253, "6aad4c833ebc92d3d284284b51ebbc94522c6853fc915aeb22b785d2fa29a158")
    ]
