"""The [deployment] policy section, operator endorsements and the same-deployment decision,
offline (the attacks against real servers are in tests/test_attacks.py, section g)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import blindfold
from blindfold.attestation.deployment import (
    DeploymentIdentity,
    Endorsement,
    deployment_change,
    identify,
    operator_key_id,
)
from blindfold.attestation.verdict import Verdict
from blindfold.errors import ConfigurationError, EvidenceError, PolicyError

SPKI = hashlib.sha256(b"server key").digest()
CODE = {"simulation": {"measurement": "ab" * 32}}


def verdict(kind: str = "simulation", **measurements: object) -> Verdict:
    return Verdict(kind=kind, measurements=dict(measurements), report_data=SPKI + bytes(32))


def policy(**deployment: object) -> blindfold.Policy:
    return blindfold.Policy.from_dict({**CODE, "deployment": deployment})


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"operator_keys": ["sha256:1234"]}, "neither sha256:<64 hex>"),
        ({"names": ["prod"]}, "names needs operator_keys"),
        ({"host_data": 5}, "must be a string or a non-empty list"),
        ({"host_data": []}, "must be a string or a non-empty list"),
        ({"host_data": ["zz"]}, "not a hex string"),
        ({"mr_config_id": ["00" * 48]}, "names no deployment"),
        ({"mr_enclave": ["00"]}, "unknown keys"),
        ({}, "pins nothing"),
    ],
)
def test_bad_deployment_sections_are_refused(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        policy(**section)


def test_operator_keys_as_pem_or_id_and_round_trip(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    parsed = policy(operator_keys=[pem, operator_key_id(key).upper().replace("SHA256", "sha256")])
    assert parsed.deployment is not None
    assert parsed.deployment.values["operator_keys"] == [operator_key_id(key)] * 2
    written = tmp_path / "policy.toml"
    written.write_text(parsed.to_toml())
    assert blindfold.Policy.load(written).deployment == parsed.deployment


@pytest.mark.parametrize("curve", ["ed25519", "p256"])
def test_endorsements_verify_and_refuse_tampering(curve: str) -> None:
    key = (
        ed25519.Ed25519PrivateKey.generate()
        if curve == "ed25519"
        else ec.generate_private_key(ec.SECP256R1())
    )
    endorsement = Endorsement.sign(key, "prod", SPKI)
    endorsement.verify(SPKI)
    parsed = Endorsement.from_json(endorsement.to_json())
    parsed.verify(SPKI)
    with pytest.raises(EvidenceError, match="copied from another server"):
        parsed.verify(hashlib.sha256(b"other").digest())
    with pytest.raises(EvidenceError, match="does not verify"):
        Endorsement.from_json(endorsement.to_json() | {"deployment": "staging"}).verify(SPKI)
    broken: object
    for broken in ({}, {"format": "x"}, endorsement.to_json() | {"signature": "!"}, []):
        with pytest.raises(EvidenceError, match="malformed"):
            Endorsement.from_json(broken)


def test_only_ed25519_and_p256_operator_keys() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    document = Endorsement.sign(ed25519.Ed25519PrivateKey.generate(), "prod", SPKI).to_json()
    document["operator_key"] = base64.b64encode(
        p384.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).decode()
    with pytest.raises(EvidenceError, match="Ed25519 or ECDSA P-256"):
        Endorsement.from_json(document)


def test_pins_apply_by_tee_kind() -> None:
    snp_only = policy(host_data=["11" * 32])
    assert snp_only.deployment is not None
    with pytest.raises(PolicyError, match="pins nothing"):
        snp_only.deployment.verify(verdict("tdx", mr_config_id="11" * 48), None)
    snp_only.deployment.verify(verdict("sev-snp", host_data="11" * 32), None)
    with pytest.raises(PolicyError, match="host_data"):
        snp_only.deployment.verify(verdict("sev-snp", host_data="22" * 32), None)
    simulated = policy(simulation_deployment_id="prod")
    assert simulated.deployment is not None
    simulated.deployment.verify(verdict(deployment_id="prod"), None)
    with pytest.raises(PolicyError, match="deployment_id"):
        simulated.deployment.verify(verdict(deployment_id="Prod"), None)


def test_operator_pin_needs_the_named_key_and_name() -> None:
    operator = ed25519.Ed25519PrivateKey.generate()
    other = ed25519.Ed25519PrivateKey.generate()
    pinned = policy(operator_keys=[operator_key_id(operator.public_key())], names=["prod"])
    assert pinned.deployment is not None
    check = pinned.deployment.verify
    check(verdict(), Endorsement.sign(operator, "prod", SPKI))
    with pytest.raises(PolicyError, match="not endorsed this server's key yet"):
        check(verdict(), None)
    with pytest.raises(PolicyError, match="Another operator"):
        check(verdict(), Endorsement.sign(other, "prod", SPKI))
    with pytest.raises(PolicyError, match="deployment name"):
        check(verdict(), Endorsement.sign(operator, "staging", SPKI))


def test_identity_ignores_unset_launch_fields() -> None:
    assert not identify(verdict(deployment_id=""), None).known
    assert not identify(verdict("sev-snp", host_data="00" * 32), None).known
    assert identify(verdict("sev-snp", host_data="AB" * 32), None).hardware == (
        "host_data",
        "ab" * 32,
    )
    key = ed25519.Ed25519PrivateKey.generate()
    endorsed = identify(verdict(), Endorsement.sign(key, "prod", SPKI))
    assert endorsed.operator == (operator_key_id(key.public_key()), "prod")


def test_same_deployment_decision() -> None:
    unknown = DeploymentIdentity()
    prod = DeploymentIdentity(hardware=("deployment_id", "prod"))
    staging = DeploymentIdentity(hardware=("deployment_id", "staging"))
    new = verdict(deployment_id="prod")
    assert deployment_change(None, prod, prod, new, None) is None
    reason, acceptable = deployment_change(None, unknown, unknown, new, None) or ("", False)
    assert acceptable and "no deployment identity" in reason
    reason, acceptable = deployment_change(None, prod, staging, new, None) or ("", False)
    assert acceptable and "staging" in reason
    pinned = policy(simulation_deployment_id="staging").deployment
    reason, acceptable = deployment_change(pinned, prod, prod, new, None) or ("", True)
    assert not acceptable and "[deployment] pins" in reason


@pytest.mark.parametrize("vector_id", ["sev-snp/virtee-milan", "sev-snp/gosevguest-milan"])
def test_real_snp_evidence_without_host_data_names_no_deployment(
    vector_id: str, vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    from blindfold.attestation import sevsnp

    vector = next(v for v in vector_manifest if v["id"] == vector_id)
    folder = vectors_dir / str(vector["dir"])
    collateral = {name: (folder / name).read_bytes() for name in ("vcek.der", "ask_ark.pem")}
    real = sevsnp.verify((folder / "report.bin").read_bytes(), collateral, vector["verify_at"])
    assert not identify(real, None).known  # these launches set no host_data
    pinned = blindfold.Policy.from_dict(
        {
            "sev-snp": {
                "measurement": real.measurements["measurement"],
                "min_tcb": {"bootloader": 0, "tee": 0, "snp": 0, "microcode": 0},
            },
            "deployment": {"host_data": "5a" * 32},
        }
    )
    assert pinned.deployment is not None
    with pytest.raises(PolicyError, match="host_data"):
        pinned.deployment.verify(real, None)
