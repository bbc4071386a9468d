"""The `blindfold` command line: serve, attest, measure, policy, models and inference."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from blindfold.errors import BlindfoldError


def _client(args: argparse.Namespace) -> Any:
    from blindfold.client.client import connect

    return connect(
        args.url,
        policy=args.policy,
        allow_simulation=args.allow_simulation,
        token=args.token or os.environ.get("BLINDFOLD_TOKEN"),
        verifier_options=_verifier_options(args),
    )


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _public(args: argparse.Namespace) -> bool | None:
    """`--public` or `--access public|restricted`; None keeps the server's default
    (restricted for a new model) or the replaced model's rule."""
    if args.public:
        return True
    return None if args.access is None else args.access == "public"


def _progress_bar(label: str) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if not sys.stderr.isatty() and done != total:
            return
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(
            f"\r{label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


# --- commands ---


def cmd_serve(args: argparse.Namespace) -> int:
    from blindfold.server.limits import ConnectionLimits, Limits
    from blindfold.server.main import ServerConfig, serve

    limits = Limits(
        max_model_bytes=args.max_model_bytes,
        max_request_bytes=args.max_request_bytes,
        max_json_bytes=args.max_json_bytes,
        max_tensor_elements=args.max_tensor_elements,
        max_models=args.max_models,
        max_concurrent_inferences=args.max_concurrent_inferences,
        max_model_memory=args.max_model_memory,
        max_inference_memory=args.max_inference_memory,
        inference_timeout=args.inference_timeout,
        isolation=not args.unsafe_no_isolation,
        ort_extensions=_ort_extensions_wanted(args.ort_extensions),
        max_inflight_body_bytes=args.max_inflight_body_bytes,
    )
    connections = ConnectionLimits(
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        max_header_bytes=args.max_header_bytes,
        body_timeout=args.body_timeout,
        min_body_rate=args.min_body_rate,
        keep_alive_timeout=args.keep_alive_timeout,
        tls_handshake_timeout=args.tls_handshake_timeout,
    )
    serve(
        ServerConfig(
            host=args.host,
            port=args.port,
            hostnames=args.hostname,
            tee=args.tee,
            allow_simulation_fallback=args.allow_simulation_fallback,
            limits=limits,
            connections=connections,
            upload_key_file=args.upload_key_file,
            open_upload=args.open_upload,
            open_upload_if_simulation=args.open_upload_if_simulation,
            intra_op_threads=args.intra_op_threads,
            pccs_url=args.pccs_url,
            collateral_cache=args.collateral_cache,
            amd_kds_url=None if args.no_amd_kds else args.amd_kds_url,
            encrypted_models_dir=args.encrypted_models_dir,
            access_log=args.access_log,
            store=args.store,
            simulation_evidence_lifetime=args.simulation_evidence_lifetime,
            epoch_file=args.epoch_file,
            unsafe_reset_store_epoch=args.unsafe_reset_store_epoch,
            admin_key_file=args.admin_key_file,
            store_journal=args.store_journal,
            deployment_id=args.deployment_id,
            deployment_operator_keys=args.deployment_operator_key,
            hpke_rotation_seconds=args.hpke_rotation_seconds,
            hpke_grace_seconds=args.hpke_grace_seconds,
            blindai_compat=args.blindai_compat,
            blindai_ports=_blindai_ports(args),
            unsafe_blindai_upload_without_key=args.unsafe_blindai_upload_without_key,
            log_format=args.log_format,
            cluster_policy=args.cluster_policy,
            join=args.join,
            join_or_bootstrap=args.join_or_bootstrap,
            bootstrap_replica=args.bootstrap_replica,
            replica_name=args.replica_name,
            join_wait=args.join_wait,
            advertise_url=args.advertise_url,
            unsafe_simulation_measurement=args.unsafe_simulation_measurement,
        )
    )
    return 0


def _ort_extensions_wanted(flag: bool | None) -> bool:
    from blindfold.server import ort_extensions

    if flag is None:  # neither flag given: on exactly when the package is installed
        return ort_extensions.installed()
    if flag and not ort_extensions.installed():
        raise BlindfoldError(
            "--enable-ort-extensions needs the onnxruntime-extensions package: "
            "pip install onnxruntime-extensions (or drop the flag)"
        )
    return flag


def _blindai_ports(args: argparse.Namespace) -> tuple[int, int, int]:
    from blindfold.server.blindai_compat import DEFAULT_PORTS

    given = (args.blindai_unattested_port, args.blindai_attested_port, args.blindai_management_port)
    unattested, attested, management = (
        default if port is None else port
        for port, default in zip(given, DEFAULT_PORTS, strict=True)
    )
    return unattested, attested, management


def cmd_attest(args: argparse.Namespace) -> int:
    if args.evidence is not None:
        return _attest_offline(args)
    if args.url is None:
        raise BlindfoldError("give a server URL, or --evidence FILE --kind KIND for offline checks")
    with _client(args) as client:
        _print_json({"verified": True, **client.attestation.describe()})
    return 0


def _load_offline_evidence(args: argparse.Namespace) -> Any:
    from blindfold.attestation.collateral import load_collateral
    from blindfold.attestation.verdict import Evidence

    collateral = load_collateral(args.collateral, args.kind) if args.collateral else {}
    return Evidence(args.kind, args.evidence.read_bytes(), collateral)


def _verifier_options(args: argparse.Namespace) -> Any:
    from blindfold.attestation.kinds import VerifierOptions

    return VerifierOptions(vcek_cache_dir=getattr(args, "vcek_cache", None))


def _attest_offline(args: argparse.Namespace) -> int:
    from blindfold.attestation.kinds import OFFLINE_CLI_KINDS
    from blindfold.attestation.policy import Policy
    from blindfold.attestation.verify import verify_evidence

    if args.kind is None:
        raise BlindfoldError(f"--evidence needs --kind {'|'.join(OFFLINE_CLI_KINDS)}")
    verdict = verify_evidence(_load_offline_evidence(args), args.at, _verifier_options(args))
    result: dict[str, Any] = {"genuine": True, **verdict.describe()}
    if args.policy:
        Policy.load(args.policy).verify(verdict)
        result["policy"] = "accepted"
    _print_json(result)
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from blindfold.attestation.simulation import measure_package

    print(measure_package())
    return 0


def cmd_policy_init(args: argparse.Namespace) -> int:
    from blindfold.attestation.policy import Policy, dump_toml

    header = ["Blindfold attestation policy: the TEE kinds and measured code this client trusts."]
    if args.measurement:
        policy = Policy.from_dict({"simulation": {"measurement": [args.measurement]}})
        sections = {k: v.values for k, v in policy.kinds.items()}
        header.append("simulation proves nothing; clients must also pass --allow-simulation.")
    elif args.from_evidence:
        from blindfold.attestation.verify import verify_evidence

        args.evidence = args.from_evidence
        verdict = verify_evidence(_load_offline_evidence(args), args.at, _verifier_options(args))
        sections = {verdict.kind: policy_section_from(verdict)}
        header.append("Written from evidence for a first deployment: CHECK these values against")
        header.append("a build you reproduced before trusting them.")
        print("warning: check the pinned values before trusting this policy", file=sys.stderr)
    else:
        raise BlindfoldError("policy init needs --measurement HEX or --from-evidence FILE --kind K")
    text = dump_toml(sections, header)
    Policy.from_dict(sections)  # never write a policy we would not load
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


def policy_section_from(verdict: Any) -> dict[str, Any]:
    """Pins everything the evidence measured that names the code and its configuration
    (what each kind pins is its `TeeKind.pins`); TCB status and debug stay at their safe
    defaults, so the operator opts into anything else by editing the named fields."""
    from blindfold.attestation.kinds import tee_kind

    m = verdict.measurements
    kind = verdict.kind
    section, notes = tee_kind(kind).pins(verdict)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if isinstance(m.get("tcb_eval_data_number"), int):
        section["min_tcb_eval_data_number"] = m["tcb_eval_data_number"]
    if kind != "simulation":
        section["allowed_tcb_status"] = ["UpToDate"]
        section["allow_debug"] = False
        if verdict.tcb_status not in (None, "UpToDate"):
            print(
                f"note: the evidence's TCB status is {verdict.tcb_status} (advisories: "
                f"{', '.join(verdict.advisory_ids) or 'none'}); the policy still requires "
                "UpToDate: add the status to allowed_tcb_status after review",
                file=sys.stderr,
            )
        if verdict.debug:
            print(
                "note: the evidence is from a DEBUG TEE; the policy refuses debug", file=sys.stderr
            )
    return section


def cmd_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        size = args.model.stat().st_size
        progress = _progress_bar("uploading") if size >= 8 << 20 else None
        model = client.upload_model(
            args.model,
            args.name,
            public=_public(args),
            progress=progress,
            **_model_options(args),
        )
        _print_json(model.__dict__)
    return 0


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The per-model options of `upload` and `load-encrypted` (`_model_option_arguments`)."""
    return {
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_us": args.max_queue_delay_us,
        "preferred_batch_sizes": args.preferred_batch_sizes,
        "max_concurrency": args.max_concurrency,
        "warmup_shapes": args.warmup_shapes,
    }


def _model_option_arguments(parser: argparse.ArgumentParser) -> None:
    batching = parser.add_argument_group("per-model options (README: Dynamic batching)")
    batching.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help="run up to N rows of concurrent requests together (every input and output needs "
        "a dynamic first axis); 0: no batching",
    )
    batching.add_argument(
        "--max-queue-delay-us",
        type=int,
        metavar="US",
        help="how long a request may wait for others to batch with (microseconds)",
    )
    batching.add_argument(
        "--preferred-batch-sizes",
        type=lambda text: [int(size) for size in text.split(",") if size],
        metavar="N,M",
        help="batch sizes to send at once when reached, e.g. 4,8",
    )
    batching.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help="at most N runs of this model at once (default: --max-concurrent-inferences)",
    )
    batching.add_argument(
        "--warmup-shapes",
        type=_warmup_shapes,
        metavar="INPUT:DIMS,...",
        help="run the model once on zeros of these input shapes before it is ready, e.g. "
        "images:1x3x640x640 (README: Warm-up shapes)",
    )


def _warmup_shapes(text: str) -> dict[str, list[int]]:
    """`images:1x3x640x640,mask:1x128` as {input: dims}; the server checks the values."""
    shapes: dict[str, list[int]] = {}
    for item in filter(None, text.split(",")):
        name, _, dims = item.rpartition(":")  # the last ':': names may end in ':0'
        try:
            shapes[name] = [int(dim) for dim in dims.split("x")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not INPUT:DIMS, e.g. images:1x3x640x640"
            ) from None
    return shapes


def _read_inputs(path: Path) -> Any:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise BlindfoldError(f"inputs file {path} must be .npz, .npy or .json")


def cmd_run(args: argparse.Namespace) -> int:
    inputs = _read_inputs(args.inputs)
    with _client(args) as client:
        outputs = client.run_model(
            args.model, inputs, dtype=args.dtype, receipt=args.receipt is not None
        )
    if args.receipt is not None:
        outputs.receipt.save(args.receipt)
        print(f"wrote verified receipt {args.receipt}", file=sys.stderr)
    if args.out:
        written = _save_private_npz(args.out, outputs)
        print(f"wrote {written}")
    else:
        _print_json(
            {
                name: {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tolist()}
                for name, a in outputs.items()
            }
        )
    return 0


def _save_private_npz(path: Path, arrays: dict[str, Any]) -> Path:
    """Writes `arrays` readable by this user only: the file is created with mode 0600, so no
    other user can open it even while it is being written (outputs may be patient data)."""
    if path.suffix != ".npz":  # what np.savez does with a path
        path = path.with_name(path.name + ".npz")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(descriptor, 0o600)  # an existing file keeps its old mode through O_CREAT
        np.savez(handle, **arrays)
    return path


def cmd_encrypt_model(args: argparse.Namespace) -> int:
    from blindfold.sealing import encrypt_model_file

    out = args.out or args.model.with_name(args.model.name + ".enc")
    key_path = args.key_out or out.with_name(out.name + ".key.json")
    key = encrypt_model_file(args.model, out)
    key.save(key_path)
    print(
        f"wrote {out} (ciphertext, safe to leave on the host) and {key_path} (the key: "
        f"keep it secret; model sha256 {key.sha256})"
    )
    return 0


def cmd_load_encrypted(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.load_encrypted_model(
            args.name, args.path, args.key, public=_public(args), **_model_options(args)
        )
        _print_json(model.__dict__)
    return 0


def _verify_evidence_under(args: argparse.Namespace) -> Callable[[Any, bytes], Any]:
    from blindfold.attestation.policy import Policy
    from blindfold.attestation.verify import verify_server_evidence

    policy = Policy.load(args.policy) if args.policy else Policy.simulation()

    def check(evidence: Any, certificate_der: bytes) -> Any:
        return verify_server_evidence(
            evidence,
            certificate_der,
            policy,
            nonce=None,
            allow_simulation=args.allow_simulation,
            at=args.at,
        )

    return check


def cmd_receipt_verify(args: argparse.Namespace) -> int:
    from blindfold.receipts import SavedReceipt

    saved = SavedReceipt.load(args.file)
    inputs = _read_inputs(args.inputs) if args.inputs else None
    outputs = _read_inputs(args.outputs) if args.outputs else None
    verdict = saved.verify(
        verify_evidence=_verify_evidence_under(args), inputs=inputs, outputs=outputs
    )
    _print_json(
        {
            "verified": True,
            "receipt": saved.receipt.to_json(),
            "tensors_checked": inputs is not None or outputs is not None,
            "attestation": verdict.describe(),
        }
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_model(args.name)
    print(f"deleted {args.name}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.list_models())
    return 0


def cmd_export_cert(args: argparse.Namespace) -> int:
    with _client(args) as client:
        args.out.write_text(client.attestation.certificate_pem)
        print(
            f"verified the server, wrote its pinned certificate to {args.out} "
            f"(public key SHA-256 {client.attestation.spki_sha256.hex()})"
        )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.keys_command == "create":
            key_id, run_key = client.create_run_key(args.name)
            _print_json({"model": args.name, "key_id": key_id, "run_key": run_key})
        else:
            client.revoke_run_key(args.name, args.key_id)
            print(f"revoked run key {args.key_id} of {args.name}")
    return 0


def cmd_upload_key_new(args: argparse.Namespace) -> int:
    from blindfold.server.main import new_upload_key

    key, line = new_upload_key()
    if args.key_file is not None:
        descriptor = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a") as handle:
            handle.write(line + "\n")
        print(f"appended {line} to {args.key_file}", file=sys.stderr)
    print(
        "give the upload key to whoever uploads (keep it secret); put only the sha256: line "
        "in the server's --upload-key-file (safe on the host, or measured into the image)",
        file=sys.stderr,
    )
    _print_json({"upload_key": key, "key_file_line": line})
    return 0


def cmd_access(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.set_public(args.name, args.access == "public")
    print(f"model {args.name} is now {args.access}")
    return 0


def cmd_deployment_keygen(args: argparse.Namespace) -> int:
    from blindfold.attestation.deployment import generate_operator_key

    private_pem, public_pem, key_id = generate_operator_key()
    descriptor = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path = args.out.with_name(args.out.name + ".pub")
    public_path.write_bytes(public_pem)
    print(f"operator private key: {args.out} (keep it offline)")
    print(f"operator public key:  {public_path}")
    print(f'policy line:          [deployment] operator_keys = ["{key_id}"]')
    return 0


def cmd_deployment_endorse(args: argparse.Namespace) -> int:
    import dataclasses

    from blindfold.attestation.deployment import load_operator_private_key
    from blindfold.attestation.policy import Policy
    from blindfold.client.client import connect

    key = load_operator_private_key(args.operator_key)
    # The operator attests the code only: this server's key is not endorsed yet, which is
    # what the policy's [deployment] section would require.
    policy = Policy.load(args.policy) if args.policy else Policy.simulation()
    policy = dataclasses.replace(policy, deployment=None)
    with connect(args.url, policy=policy, allow_simulation=args.allow_simulation) as client:
        endorsement = client.endorse_deployment(key, args.name)
        print(
            f"endorsed {args.url} (TLS public key SHA-256 {endorsement.spki_sha256.hex()}) as "
            f"deployment {endorsement.deployment!r} with operator key "
            f"{endorsement.operator_key_id}"
        )
    return 0


# --- parser ---

VCEK_CACHE_HELP = (
    "SEV-SNP: folder of AMD VCEK certificates for servers that do not publish theirs, named "
    "<chip id hex>-<bl>-<tee>-<snp>-<ucode>.der (the AMD KDS parameters)"
)


def _client_options(parser: argparse.ArgumentParser, url_required: bool = True) -> None:
    if url_required:
        parser.add_argument("url", help="server URL, e.g. https://127.0.0.1:8443")
    parser.add_argument("--policy", type=Path, help="attestation policy TOML file")
    parser.add_argument(
        "--allow-simulation",
        action="store_true",
        help="accept the simulation TEE (it protects nothing)",
    )
    parser.add_argument(
        "--token", help="upload key, owner token or run key (default: $BLINDFOLD_TOKEN)"
    )
    parser.add_argument("--vcek-cache", type=Path, help=VCEK_CACHE_HELP)


def build_parser() -> argparse.ArgumentParser:
    from blindfold.attestation.kinds import OFFLINE_CLI_KINDS, TEE_KINDS
    from blindfold.server.limits import ConnectionLimits, Limits
    from blindfold.server.tee.kds import AMD_KDS_URL

    parser = argparse.ArgumentParser(prog="blindfold", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = Limits()
    slow = ConnectionLimits()

    from blindfold.server.hpke_keys import DEFAULT_GRACE_SECONDS, DEFAULT_ROTATION_SECONDS

    serve = commands.add_parser("serve", help="run the attested inference server")
    # The environment variables set these in the container image, whose health check reads
    # BLINDFOLD_PORT too.
    serve.add_argument(
        "--host",
        default=os.environ.get("BLINDFOLD_HOST", "127.0.0.1"),
        help="address to listen on (default: $BLINDFOLD_HOST or 127.0.0.1)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=os.environ.get("BLINDFOLD_PORT", "8443"),
        help="port to listen on (default: $BLINDFOLD_PORT or 8443)",
    )
    serve.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="extra DNS name or IP for the certificate (repeatable)",
    )
    serve.add_argument(
        "--tee",
        default="simulation",
        choices=["auto", *TEE_KINDS],
    )
    serve.add_argument(
        "--allow-simulation-fallback",
        action="store_true",
        help="with --tee auto: use simulation when no TEE hardware is found",
    )
    serve.add_argument("--max-model-bytes", type=int, default=defaults.max_model_bytes)
    serve.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes)
    serve.add_argument(
        "--max-json-bytes",
        type=int,
        default=defaults.max_json_bytes,
        help="limit for JSON tensor data and BYTES tensors (large tensors go as binary data)",
    )
    serve.add_argument(
        "--max-inflight-body-bytes",
        type=int,
        default=defaults.max_inflight_body_bytes,
        help="bytes of request bodies held at once over all requests; over it: 503 with "
        "Retry-After (default 0: a quarter of the machine's memory)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=slow.max_connections,
        help="connections served at once; when full, the longest-waiting idle one is closed",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=slow.header_timeout,
        help="seconds for a request's headers to arrive (else 408)",
    )
    serve.add_argument("--max-header-bytes", type=int, default=slow.max_header_bytes)
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=slow.body_timeout,
        help="seconds per window in which a body must arrive at --min-body-rate",
    )
    serve.add_argument(
        "--min-body-rate",
        type=int,
        default=slow.min_body_rate,
        help="bytes per second a request body must keep up (else 408)",
    )
    serve.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=slow.keep_alive_timeout,
        help="seconds an idle connection stays open between requests",
    )
    serve.add_argument(
        "--tls-handshake-timeout",
        type=float,
        default=slow.tls_handshake_timeout,
        help="seconds for a client to finish the TLS handshake",
    )
    serve.add_argument("--max-tensor-elements", type=int, default=defaults.max_tensor_elements)
    serve.add_argument("--max-models", type=int, default=defaults.max_models)
    serve.add_argument(
        "--max-concurrent-inferences", type=int, default=defaults.max_concurrent_inferences
    )
    serve.add_argument(
        "--max-model-memory",
        type=int,
        default=defaults.max_model_memory,
        help="bytes all loaded models may hold together; an upload beyond it gets 507 "
        "(default: half the machine's memory)",
    )
    serve.add_argument(
        "--max-inference-memory",
        type=int,
        default=defaults.max_inference_memory,
        help="bytes one model's worker may take at run time beyond its model (default: a "
        "quarter of the machine's memory, 1-16 GiB; 0 = no limit)",
    )
    serve.add_argument(
        "--inference-timeout",
        type=float,
        default=defaults.inference_timeout,
        help="seconds one inference may run before it is stopped (default: 60)",
    )
    serve.add_argument(
        "--unsafe-no-isolation",
        action="store_true",
        help="UNSAFE, for benchmarks only: run models inside the process that holds the "
        "TLS, receipt and sealing keys, with no memory or time limit",
    )
    extensions = serve.add_mutually_exclusive_group()
    extensions.add_argument(
        "--enable-ort-extensions",
        dest="ort_extensions",
        action="store_true",
        default=None,
        help="accept models that use onnxruntime-extensions' custom operators (domain "
        "ai.onnx.contrib: tokenizers, string and audio pre/post-processing); the default when "
        "the onnxruntime-extensions package is installed",
    )
    extensions.add_argument(
        "--no-ort-extensions",
        dest="ort_extensions",
        action="store_false",
        help="refuse every custom-operator domain, even when onnxruntime-extensions is installed",
    )
    serve.add_argument(
        "--upload-key-file",
        type=Path,
        help="file with one upload key per line: sha256:<hex> of a key (from blindfold "
        "upload-key new), or the key itself (at least 22 characters; warned about)",
    )
    serve.add_argument("--pccs-url", help="Intel PCS/PCCS base URL for SGX/TDX collateral")
    serve.add_argument(
        "--encrypted-models-dir",
        type=Path,
        help="folder from which load-encrypted may read model files (default: disabled)",
    )
    serve.add_argument(
        "--collateral-cache", type=Path, help="folder caching Intel collateral and AMD VCEKs"
    )
    serve.add_argument(
        "--amd-kds-url",
        default=AMD_KDS_URL,
        help="SEV-SNP: where to fetch this chip's VCEK when the host provisioned none",
    )
    serve.add_argument(
        "--no-amd-kds", action="store_true", help="SEV-SNP: never fetch a VCEK from AMD KDS"
    )
    serve.add_argument(
        "--simulation-evidence-lifetime",
        type=int,
        metavar="SECONDS",
        help="simulation only: evidence expires after SECONDS, like hardware collateral does "
        "(to exercise re-attestation; default: never)",
    )
    serve.add_argument(
        "--open-upload", action="store_true", help="let anyone who attests the server upload models"
    )
    serve.add_argument(
        "--open-upload-if-simulation",
        action="store_true",
        help="open upload on the simulation TEE only; on a hardware TEE generate an upload key "
        "and print it (what bin/serve does without arguments)",
    )
    serve.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime threads per inference (0 = onnxruntime's default)",
    )
    serve.add_argument("--access-log", action="store_true")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="stderr log lines as text, or as JSON objects (timestamp, level, logger, message, "
        "request_id, model, model_sha256); never payloads, tokens or tensor values",
    )
    serve.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        help="keep models across restarts in DIR, sealed under the TEE's measurement-bound "
        "key (SGX, SEV-SNP; simulation uses an insecure key file). Default: memory only",
    )
    serve.add_argument(
        "--epoch-file",
        type=Path,
        metavar="PATH",
        help="keep the store's epoch (rollback detection) in PATH, ideally on another medium "
        "than the store. Default: DIR/epoch.sealed",
    )
    serve.add_argument(
        "--unsafe-reset-store-epoch",
        action="store_true",
        help="UNSAFE: accept the store as the newest state even if it is older than the epoch "
        "file says, or the epoch file is missing (after restoring a backup on purpose)",
    )
    serve.add_argument(
        "--admin-key-file",
        type=Path,
        help="operator keys (one per line, or sha256:<hex>) that may replace or delete a "
        "stored model whose row the store refused",
    )
    serve.add_argument(
        "--store-journal",
        choices=["auto", "wal", "delete"],
        default="auto",
        help="SQLite journal of the store: wal (concurrent readers; needs shared memory) or "
        "delete (rollback journal, exclusive lock; works in Gramine). auto: delete under SGX",
    )
    serve.add_argument(
        "--deployment-id",
        default="",
        help="simulation TEE only: a deployment name put into the evidence, standing in for "
        "SEV-SNP host_data / TDX mr_config_id",
    )
    serve.add_argument(
        "--cluster-policy",
        type=Path,
        metavar="P.toml",
        help="take part in a cluster of replicas sharing one service identity: peers and "
        "joiners must pass this policy (a client policy plus [cluster]; see README 'Scaling out')",
    )
    serve.add_argument(
        "--join",
        metavar="URL",
        default=os.environ.get("BLINDFOLD_JOIN") or None,
        help="join the replica at URL: attest it and be attested by it under --cluster-policy, "
        "then receive the service identity and the models (default $BLINDFOLD_JOIN)",
    )
    serve.add_argument(
        "--join-or-bootstrap",
        action="store_true",
        help="with --join and --bootstrap-replica: when nothing answers at URL, the replica "
        "named by --bootstrap-replica starts a new service identity; every other replica keeps "
        "trying to join (up to --join-wait) and never starts one; a refusal still fails",
    )
    serve.add_argument(
        "--bootstrap-replica",
        metavar="NAME",
        help="with --join-or-bootstrap: the one replica (by --replica-name) that may start a "
        "new service identity, so that replicas starting together never make two",
    )
    serve.add_argument(
        "--replica-name",
        metavar="NAME",
        help="this replica's name for --bootstrap-replica (default: the host name, which is "
        "the pod name in a Kubernetes StatefulSet)",
    )
    serve.add_argument(
        "--join-wait",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="with --join-or-bootstrap, on a replica that may not bootstrap: how long to keep "
        "trying to reach a peer before giving up (default 300)",
    )
    serve.add_argument(
        "--advertise-url",
        default=os.environ.get("BLINDFOLD_ADVERTISE_URL") or None,
        help="how other replicas reach this one (default https://HOST:PORT, or "
        "$BLINDFOLD_ADVERTISE_URL)",
    )
    serve.add_argument(
        "--unsafe-simulation-measurement",
        metavar="HEX",
        help="simulation TEE, tests only: claim this measurement instead of the package's "
        "(stands in for a replica running other code)",
    )
    serve.add_argument(
        "--deployment-operator-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUBKEY",
        help="PEM public key of an operator who may endorse this server (repeatable; "
        "default: the first operator to endorse it)",
    )
    serve.add_argument(
        "--hpke-rotation-seconds",
        type=float,
        default=DEFAULT_ROTATION_SECONDS,
        help="make a new HPKE key for Oblivious HTTP (channel='ohttp') this often "
        "(default: %(default)s); clients re-attest when their key is gone",
    )
    serve.add_argument(
        "--hpke-grace-seconds",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help="keep accepting the replaced HPKE key this long (default: %(default)s)",
    )
    serve.add_argument(
        "--blindai-compat",
        action="store_true",
        help="also serve BlindAI 0.6 clients on its three ports (no tokens, no attestation "
        "the BlindAI client can check outside simulation mode: for migration only)",
    )
    for port_name, what in (
        ("unattested", "plain HTTP, the certificate; default 9923"),
        ("attested", "TLS, /run; default 9924"),
        ("management", "TLS, /upload and /delete; default 9925"),
    ):
        serve.add_argument(
            f"--blindai-{port_name}-port",
            type=int,
            help=f"with --blindai-compat: BlindAI's {port_name} port ({what})",
        )
    serve.add_argument(
        "--unsafe-blindai-upload-without-key",
        action="store_true",
        help="UNSAFE: with --blindai-compat on a server that needs an upload key, still let "
        "anyone who reaches the BlindAI management port upload models and delete them",
    )
    serve.set_defaults(handler=cmd_serve)

    attest = commands.add_parser("attest", help="verify a server's (or saved) evidence")
    attest.add_argument("url", nargs="?")
    attest.add_argument("--policy", type=Path)
    attest.add_argument("--allow-simulation", action="store_true")
    attest.add_argument("--token", help=argparse.SUPPRESS)
    attest.add_argument("--evidence", type=Path, help="saved evidence file (offline check)")
    attest.add_argument("--kind", choices=OFFLINE_CLI_KINDS)
    attest.add_argument(
        "--collateral",
        type=Path,
        help="vector-style folder, dcap-qvl collateral JSON, or VCEK cert",
    )
    attest.add_argument("--at", type=int, help="verification time, unix seconds (default: now)")
    attest.add_argument("--vcek-cache", type=Path, help=VCEK_CACHE_HELP)
    attest.set_defaults(handler=cmd_attest)

    measure = commands.add_parser("measure", help="print the simulation measurement of this code")
    measure.set_defaults(handler=cmd_measure)

    policy = commands.add_parser("policy", help="write attestation policies")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    init = policy_commands.add_parser("init", help="write a policy pinning a measurement")
    init.add_argument("--measurement", help="simulation measurement (blindfold measure)")
    init.add_argument("--from-evidence", type=Path, help="pin what this evidence measured")
    init.add_argument("--kind", choices=OFFLINE_CLI_KINDS)
    init.add_argument("--collateral", type=Path)
    init.add_argument("--vcek-cache", type=Path, help=VCEK_CACHE_HELP)
    init.add_argument("--at", type=int)
    init.add_argument("--out", type=Path, required=True)
    init.set_defaults(handler=cmd_policy_init)

    upload = commands.add_parser("upload", help="upload an ONNX model")
    _client_options(upload)
    upload.add_argument("model", type=Path)
    upload.add_argument("--name")
    upload.add_argument("--access", choices=["public", "restricted"])
    upload.add_argument(
        "--public", action="store_true", help="let anyone who attests the server run it"
    )
    _model_option_arguments(upload)
    upload.set_defaults(handler=cmd_upload)

    run = commands.add_parser("run", help="run a model on inputs from .npz/.npy/.json")
    _client_options(run)
    run.add_argument("model", help="model name or sha256:<hex>")
    run.add_argument("inputs", type=Path)
    run.add_argument("--dtype", help="numpy dtype for JSON (list) inputs")
    run.add_argument("--out", type=Path, help="write outputs to this .npz")
    run.add_argument("--receipt", type=Path, help="request a signed receipt, save it here")
    run.set_defaults(handler=cmd_run)

    encrypt = commands.add_parser(
        "encrypt-model", help="encrypt an ONNX file to leave on the untrusted host"
    )
    encrypt.add_argument("model", type=Path)
    encrypt.add_argument("--out", type=Path, help="ciphertext (default: MODEL.enc)")
    encrypt.add_argument("--key-out", type=Path, help="key file (default: OUT.key.json)")
    encrypt.set_defaults(handler=cmd_encrypt_model)

    load_encrypted = commands.add_parser(
        "load-encrypted", help="serve an encrypted model file that is on the server's disk"
    )
    _client_options(load_encrypted)
    load_encrypted.add_argument("name")
    load_encrypted.add_argument("path", help="path of the .enc file on the server")
    load_encrypted.add_argument("key", type=Path, help="key file from encrypt-model")
    load_encrypted.add_argument("--access", choices=["public", "restricted"])
    load_encrypted.add_argument(
        "--public", action="store_true", help="let anyone who attests the server run it"
    )
    _model_option_arguments(load_encrypted)
    load_encrypted.set_defaults(handler=cmd_load_encrypted)

    receipt = commands.add_parser("receipt", help="verify saved inference receipts offline")
    receipt_commands = receipt.add_subparsers(dest="receipt_command", required=True)
    verify = receipt_commands.add_parser("verify")
    verify.add_argument("file", type=Path)
    verify.add_argument("--inputs", type=Path, help=".npz of the inputs sent (recomputes digests)")
    verify.add_argument("--outputs", type=Path, help=".npz of the outputs received")
    verify.add_argument("--policy", type=Path, help="policy (default: this package's code)")
    verify.add_argument("--allow-simulation", action="store_true")
    verify.add_argument("--at", type=int, help="verification time, unix seconds")
    verify.set_defaults(handler=cmd_receipt_verify)

    delete = commands.add_parser("delete", help="unload and delete a model (owner token)")
    _client_options(delete)
    delete.add_argument("name")
    delete.set_defaults(handler=cmd_delete)

    models = commands.add_parser("models", help="list the server's models")
    _client_options(models)
    models.set_defaults(handler=cmd_models)

    export = commands.add_parser("export-cert", help="verify, then write the pinned certificate")
    _client_options(export)
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(handler=cmd_export_cert)

    keys = commands.add_parser("keys", help="issue or revoke run keys (owner token)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create")
    _client_options(create)
    create.add_argument("name")
    revoke = key_commands.add_parser("revoke")
    _client_options(revoke)
    revoke.add_argument("name")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=cmd_keys)

    # `keys` already names run keys; upload keys (who may upload) get their own command.
    upload_key = commands.add_parser("upload-key", help="make upload keys for --upload-key-file")
    upload_key_commands = upload_key.add_subparsers(dest="upload_key_command", required=True)
    new_key = upload_key_commands.add_parser(
        "new", help="print a fresh upload key and its sha256: line for --upload-key-file"
    )
    new_key.add_argument(
        "--key-file", type=Path, help="also append the sha256: line to this file (mode 0600)"
    )
    new_key.set_defaults(handler=cmd_upload_key_new)

    access = commands.add_parser("access", help="make a model public or restricted (owner)")
    _client_options(access)
    access.add_argument("name")
    access.add_argument("access", choices=["public", "restricted"])
    access.set_defaults(handler=cmd_access)

    deployment = commands.add_parser(
        "deployment", help="operator keys that name a deployment (clients follow restarts)"
    )
    deployment_commands = deployment.add_subparsers(dest="deployment_command", required=True)
    keygen = deployment_commands.add_parser("keygen", help="make an Ed25519 operator key")
    keygen.add_argument("--out", type=Path, required=True, help="private key file (0600)")
    keygen.set_defaults(handler=cmd_deployment_keygen)
    endorse = deployment_commands.add_parser(
        "endorse", help="attest a server, then endorse its TLS key as a deployment"
    )
    endorse.add_argument("url", help="server URL, e.g. https://127.0.0.1:8443")
    endorse.add_argument("--operator-key", type=Path, required=True, help="PEM private key")
    endorse.add_argument("--name", required=True, help="deployment name, e.g. prod-eu")
    endorse.add_argument("--policy", type=Path, help="attestation policy TOML file")
    endorse.add_argument("--allow-simulation", action="store_true")
    endorse.set_defaults(handler=cmd_deployment_endorse)
    return parser


def _show_warning_as_one_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """The SDK warns library users with `warnings.warn` (they filter it by category); a
    command-line user gets one line, without Python's file name and source line."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning_as_one_line
    try:
        code: int = args.handler(args)
        return code
    except BlindfoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
