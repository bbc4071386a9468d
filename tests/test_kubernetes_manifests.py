"""deploy/kubernetes: every manifest is valid for a recent Kubernetes (kubernetes-validate's
strict schemas), the kustomization names exactly the files there, the server accepts the
StatefulSet's arguments, and its memory budget fits the container's limit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from blindfold.cli import build_parser
from blindfold.server.cluster import ClusterPolicy

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

KUBERNETES = "1.34.0"  # a recent release, with strict schemas (unknown fields are errors)
BASE = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def kustomization() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return document


def resources() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for name in kustomization()["resources"]:
        documents.extend(d for d in yaml.safe_load_all((BASE / name).read_text()) if d)
    return documents


def test_the_kustomization_names_every_manifest_and_nothing_else() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    for generator in kustomization()["configMapGenerator"]:
        for name in generator["files"]:
            assert (BASE / name).is_file()


@pytest.mark.parametrize(
    "document", resources(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_every_manifest_is_valid(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_generated_config_map_is_valid_and_holds_a_cluster_policy(tmp_path: Path) -> None:
    generator = kustomization()["configMapGenerator"][0]
    data = {name: (BASE / name).read_text() for name in generator["files"]}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generator["name"]},
        "data": data,
    }
    kubernetes_validate.validate(config_map, KUBERNETES, strict=True)
    policy = ClusterPolicy.load(BASE / "cluster-policy.toml")
    assert not policy.allow_simulation and "sev-snp" in policy.policy.kinds


def _statefulset() -> dict[str, Any]:
    return next(d for d in resources() if d["kind"] == "StatefulSet")


def test_the_server_accepts_the_statefulset_arguments() -> None:
    container = _statefulset()["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(["serve", *container["args"]])
    assert args.join == "https://blindfold-peers:8443" and args.join_or_bootstrap
    # Only the first pod may start the service identity; the others wait to join it.
    statefulset = _statefulset()
    assert args.bootstrap_replica == f"{statefulset['metadata']['name']}-0"
    assert args.replica_name == "$(POD_NAME)"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert args.cluster_policy == Path("/etc/blindfold/cluster-policy.toml")
    probes = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert probes == {"/v2/health/ready", "/v2/health/live"}


def test_the_memory_budget_fits_the_container_limit() -> None:
    spec = _statefulset()["spec"]["template"]["spec"]
    container = spec["containers"][0]
    args = build_parser().parse_args(["serve", *container["args"]])
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert _bytes(container["resources"]["requests"]["memory"]) == limit
    # Models, one worker's run time and the bodies in flight fit, with room for the server.
    budget = args.max_model_memory + args.max_inference_memory + args.max_inflight_body_bytes
    assert budget < limit
    assert args.max_inflight_body_bytes >= args.max_model_bytes
    assert spec["runtimeClassName"].startswith("kata")


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert match, quantity
    return int(match[1]) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[match[2]]
