"""BlindAI 0.6 wire compatibility (`blindfold serve --blindai-compat`), tested on the wire as
blindai 0.6.3's client talks (blindai/client.py, `BlindAiConnection`): requests sessions, CBOR
bodies made with cbor2, the certificate fetched over plain HTTP and then trusted as the only
CA with the host name `blindai-srv`. Bad input must get HTTP 500 with a CBOR text string, as
BlindAI answered, and leave the server serving."""

from __future__ import annotations

import hashlib
import socket
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from onnx import TensorProto, helper
from requests.adapters import HTTPAdapter

import blindfold
from blindfold.attestation.binding import public_key_sha256
from blindfold.errors import AuthenticationError
from blindfold.server import blindai_compat
from blindfold.server.blindai_compat import CborReader, read_upload

from conftest import ServerProcess, free_port, start_server
from onnx_models import add_mul_model, identity_model
from server_process import unverified_context

# BlindAI's ModelDatumType: code, name, numpy type, ONNX element type.
DATUM_TYPES = [
    (0, "F32", "<f4", TensorProto.FLOAT),
    (1, "F64", "<f8", TensorProto.DOUBLE),
    (2, "I32", "<i4", TensorProto.INT32),
    (3, "I64", "<i8", TensorProto.INT64),
    (4, "U32", "<u4", TensorProto.UINT32),
    (5, "U64", "<u8", TensorProto.UINT64),
    (6, "U8", "<u1", TensorProto.UINT8),
    (7, "U16", "<u2", TensorProto.UINT16),
    (8, "I8", "<i1", TensorProto.INT8),
    (9, "I16", "<i2", TensorProto.INT16),
    (10, "Bool", "?", TensorProto.BOOL),
]

CLIENT_INFO = {  # blindai's _ClientInfo, all eight fields
    "uid": hashlib.sha256(b"host-user").hexdigest(),
    "platform_name": "Linux",
    "platform_arch": "x86_64",
    "platform_version": "#1 SMP",
    "platform_release": "6.1.0",
    "user_agent": "blindai_python",
    "user_agent_version": "0.6.3",
    "is_colab": False,
}


class _BlindAIHostName(HTTPAdapter):
    """blindai's CustomHostNameCheckingAdapter: whatever address was dialed, the certificate
    must name `blindai-srv`."""

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.assert_hostname = "blindai-srv"
        super().cert_verify(conn, url, verify, cert)


class BlindAIWire:
    """The requests blindai 0.6.3's `connect(addr, hazmat_http_on_unattested_port=True,
    simulation_mode=True)` makes, then its upload/run/delete bodies."""

    def __init__(self, ports: tuple[int, int, int], directory: Path) -> None:
        unattested, attested, management = ports
        self.unattested_url = f"http://127.0.0.1:{unattested}"
        self.attested_url = f"https://127.0.0.1:{attested}"
        self.management_url = f"https://127.0.0.1:{management}"
        first = requests.get(self.unattested_url, timeout=30)
        first.raise_for_status()
        self.server_header = first.headers["Server"]
        self.certificate_der = cbor2.loads(first.content)
        certificate = x509.load_der_x509_certificate(self.certificate_der)
        self.ca_file = directory / f"blindai-{uuid.uuid4().hex}.pem"
        self.ca_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        self.session = requests.Session()
        self.session.mount(self.attested_url, _BlindAIHostName())
        self.session.mount(self.management_url, _BlindAIHostName())
        self.session.get(self.attested_url, verify=str(self.ca_file), timeout=30)

    def post(self, url: str, body: bytes) -> requests.Response:
        # `verify` on each request: REQUESTS_CA_BUNDLE, when set, overrides a session's own.
        return self.session.post(url, data=body, verify=str(self.ca_file), timeout=120)

    def upload(self, model: bytes, **fields: Any) -> requests.Response:
        document = {
            "model": list(model),
            "length": len(model),
            "model_name": "model.onnx",
            "optimize": True,
            "client_info": CLIENT_INFO,
            **fields,
        }
        return self.post(f"{self.management_url}/upload", cbor2.dumps(document))

    def run(
        self, inputs: list[dict[str, Any]], model_id: str = "", model_hash: str = ""
    ) -> requests.Response:
        document = {
            "model_hash": model_hash,
            "model_id": model_id,
            "inputs": inputs,
            "client_info": CLIENT_INFO,
        }
        return self.post(f"{self.attested_url}/run", cbor2.dumps(document))

    def delete(self, model_id: str) -> requests.Response:
        return self.post(f"{self.management_url}/delete", cbor2.dumps({"model_id": model_id}))


def tensor(array: np.ndarray, code: int = 0, name: str | None = None) -> dict[str, Any]:
    """blindai's translate_tensor: shape, datum_type (an IntEnum, so an integer in CBOR),
    node_name, and the little-endian bytes."""
    fmt = next(f for c, _, f, _ in DATUM_TYPES if c == code)
    return {
        "info": {"fact": list(array.shape), "datum_type": code, "node_name": name},
        "bytes_data": np.asarray(array).astype(fmt).tobytes(),
    }


def ok(response: requests.Response) -> Any:
    assert response.status_code == 200, (response.status_code, response.content[:300])
    assert response.headers["content-type"] == "application/cbor"
    return cbor2.loads(response.content)


def refused(response: requests.Response) -> str:
    """BlindAI's error answer: HTTP 500, a CBOR text string."""
    assert response.status_code == 500, (response.status_code, response.content[:300])
    assert response.headers["content-type"] == "application/cbor"
    message = cbor2.loads(response.content)
    assert isinstance(message, str) and message
    return message


def _ports() -> list[str]:
    ports = [free_port(), free_port(), free_port()]
    return [
        "--blindai-compat",
        "--blindai-unattested-port",
        str(ports[0]),
        "--blindai-attested-port",
        str(ports[1]),
        "--blindai-management-port",
        str(ports[2]),
    ]


def compat_ports(server: ServerProcess) -> tuple[int, int, int]:
    args = server.args
    return (
        int(args[args.index("--blindai-unattested-port") + 1]),
        int(args[args.index("--blindai-attested-port") + 1]),
        int(args[args.index("--blindai-management-port") + 1]),
    )


@pytest.fixture(scope="module")
def compat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("blindai"),
        "--open-upload",
        "--max-model-bytes",
        "100000",
        *_ports(),
    )
    yield process
    process.stop()


@pytest.fixture
def wire(compat_server: ServerProcess, tmp_path: Path) -> BlindAIWire:
    return BlindAIWire(compat_ports(compat_server), tmp_path)


def _sdk(server: ServerProcess, **options: Any) -> blindfold.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blindfold.connect(server.url, allow_simulation=True, **options)


A = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.full((2, 4), 0.5, dtype=np.float32)


# --- the certificate port ---


def test_certificate_port_serves_the_attested_certificate(
    compat_server: ServerProcess, wire: BlindAIWire
) -> None:
    certificate = x509.load_der_x509_certificate(wire.certificate_der)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "blindai-srv" in names.get_values_for_type(x509.DNSName)
    # The key BlindAI clients pin is the one the server's evidence binds.
    with _sdk(compat_server) as client:
        assert public_key_sha256(certificate.public_key()) == client.attestation.spki_sha256
    # BlindAI's client refuses a "mock" server unless in simulation mode: simulation says so.
    assert "mock" in wire.server_header


def test_tls_ports_present_that_certificate_without_sni(
    compat_server: ServerProcess, wire: BlindAIWire
) -> None:
    for port in compat_ports(compat_server)[1:]:
        context = unverified_context()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
            context.wrap_socket(raw) as tls,  # no server_hostname: no SNI at all
        ):
            assert tls.getpeercert(binary_form=True) == wire.certificate_der


def test_off_by_default(server: ServerProcess) -> None:
    assert "BlindAI" not in server.log()
    assert "--blindai-compat" not in server.args


# --- upload, run, delete as blindai 0.6.3 sends them ---


def test_upload_run_delete_as_the_blindai_client(wire: BlindAIWire) -> None:
    model = add_mul_model().SerializeToString()
    reply = ok(wire.upload(model))
    assert set(reply) == {"hash", "model_id"}
    assert reply["hash"] == hashlib.sha256(model).digest()
    assert uuid.UUID(reply["model_id"]).version == 4
    model_id = reply["model_id"]

    # By id with node names (blindai's dict form).
    answer = ok(wire.run([tensor(A, 0, "a"), tensor(B, 0, "b")], model_id=model_id))
    assert set(answer) == {"outputs"}
    outputs = answer["outputs"]
    assert [o["info"]["node_name"] for o in outputs] == ["sum", "product"]
    for output, expected in zip(outputs, [A + B, A * B], strict=True):
        assert set(output) == {"info", "bytes_data"}
        assert set(output["info"]) == {"fact", "datum_type", "node_name"}  # TensorInfo(**info)
        assert output["info"]["fact"] == [2, 4]
        assert output["info"]["datum_type"] == "F32"
        got = np.frombuffer(output["bytes_data"], dtype="<f4").reshape(2, 4)
        np.testing.assert_array_equal(got, expected)

    # By hash, placed by position (blindai's list form: node_name null), the datum_type as a
    # name this time.
    by_position = [tensor(A), tensor(B)]
    for item in by_position:
        item["info"]["datum_type"] = "F32"
    answer = ok(wire.run(by_position, model_hash=reply["hash"].hex()))
    got = np.frombuffer(answer["outputs"][0]["bytes_data"], dtype="<f4").reshape(2, 4)
    np.testing.assert_array_equal(got, A + B)

    assert ok(wire.delete(model_id)) is None
    assert "model_id" in refused(wire.run([tensor(A), tensor(B)], model_id=model_id))
    assert "model_id" in refused(wire.delete(model_id))


def test_upload_accepts_the_model_as_a_byte_string(wire: BlindAIWire) -> None:
    model = identity_model(TensorProto.FLOAT, ["N"], name="bytes-form").SerializeToString()
    document = {"model": model, "length": len(model), "model_name": "m", "optimize": False}
    reply = ok(wire.post(f"{wire.management_url}/upload", cbor2.dumps(document)))
    assert reply["hash"] == hashlib.sha256(model).digest()
    wire.delete(reply["model_id"])


def test_every_datum_type_both_ways(wire: BlindAIWire) -> None:
    inputs = [helper.make_tensor_value_info(f"x{c}", t, ["N"]) for c, _, _, t in DATUM_TYPES]
    outputs = [helper.make_tensor_value_info(f"y{c}", t, ["N"]) for c, _, _, t in DATUM_TYPES]
    nodes = [helper.make_node("Identity", [f"x{c}"], [f"y{c}"]) for c, *_ in DATUM_TYPES]
    graph = helper.make_graph(nodes, "all_types", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_id = ok(wire.upload(model.SerializeToString()))["model_id"]
    values = {c: np.array([0, 1, 1], dtype=f) for c, _, f, _ in DATUM_TYPES}
    answer = ok(wire.run([tensor(values[c], c, f"x{c}") for c in values], model_id=model_id))
    for output, (code, name, _, _) in zip(answer["outputs"], DATUM_TYPES, strict=True):
        assert output["info"] == {"fact": [3], "datum_type": name, "node_name": f"y{code}"}
        assert output["bytes_data"] == values[code].tobytes()
    assert answer["outputs"][-1]["bytes_data"] == b"\x00\x01\x01"  # one byte per bool
    wire.delete(model_id)


def test_identical_uploads_get_their_own_ids(wire: BlindAIWire) -> None:
    model = identity_model(TensorProto.FLOAT, ["N"], name="twice").SerializeToString()
    first, second = ok(wire.upload(model)), ok(wire.upload(model))
    assert first["model_id"] != second["model_id"]
    assert first["hash"] == second["hash"]
    ok(wire.delete(first["model_id"]))
    # The shared session stays for the other id.
    answer = ok(wire.run([tensor(np.ones(2, np.float32))], model_id=second["model_id"]))
    assert answer["outputs"][0]["bytes_data"] == np.ones(2, np.float32).tobytes()
    ok(wire.delete(second["model_id"]))


def test_blindai_models_share_the_main_apis_registry(
    compat_server: ServerProcess, wire: BlindAIWire
) -> None:
    model = identity_model(TensorProto.FLOAT, ["N"], name="shared").SerializeToString()
    model_id = ok(wire.upload(model))["model_id"]
    with _sdk(compat_server) as client:
        listed = {row["name"]: row for row in client.list_models()}
        assert listed[model_id]["public"] is True  # anyone without a token sees and runs it
        result = client.run_model(model_id, {"x": np.arange(3, dtype=np.float32)})
        np.testing.assert_array_equal(result["y"], np.arange(3, dtype=np.float32))
        # Nobody owns it: no Blindfold token deletes or replaces it.
        with pytest.raises(AuthenticationError, match="BlindAI"):
            client.delete_model(model_id, token="not-an-owner-token")
        with pytest.raises(AuthenticationError):
            client.upload_model(add_mul_model(), name=model_id, token="whatever")
        # And a public Blindfold model runs on the BlindAI port by hash; a BlindAI /delete of
        # its name is refused: the port deletes only models it made.
        uploaded = client.upload_model(add_mul_model(), name="owned-add-mul", public=True)
        answer = ok(wire.run([tensor(A), tensor(B)], model_hash=uploaded.sha256))
        assert answer["outputs"][0]["info"]["node_name"] == "sum"
        refused(wire.delete("owned-add-mul"))
        client.delete_model("owned-add-mul")
    ok(wire.delete(model_id))


# --- bad input: HTTP 500 with a CBOR text string, and the server keeps serving ---


def _junk_bodies() -> list[tuple[str, bytes]]:
    return [
        ("not CBOR", b"\xff\xfe{not cbor"),
        ("truncated", cbor2.dumps({"model_id": "x" * 40})[:-5]),
        ("not a map", cbor2.dumps(["model_id", "x"])),
        ("indefinite", b"\xbf\x68model_id\x61x\xff"),
        ("tagged", cbor2.dumps({"model_id": cbor2.CBORTag(4000, "x")})),
        ("trailing bytes", cbor2.dumps({"model_id": "x"}) + b"\x00"),
        ("many items", b"\x9a\x00\x10\x00\x00" + b"\x80" * 0x100000),
        ("empty", b""),
    ]


@pytest.mark.parametrize("route", ["run", "upload", "delete"])
def test_malformed_bodies_are_refused(wire: BlindAIWire, route: str) -> None:
    url = wire.attested_url if route == "run" else wire.management_url
    for label, body in _junk_bodies():
        message = refused(wire.post(f"{url}/{route}", body))
        words = ("CBOR", "map", "model", "limit")
        assert any(word in message for word in words), (label, message)
    _still_serving(wire)


def test_bodies_of_many_small_items_are_refused_before_decoding(wire: BlindAIWire) -> None:
    # 4 MiB of empty arrays would become 4 million Python lists (about 256 MiB) if decoded.
    count = 1 << 22
    items: tuple[object, ...] = ("model_id", "x", "inputs", [], "padding")
    entries = [cbor2.dumps(item) for item in items]
    bomb = b"\xa3" + b"".join(entries) + b"\x9a" + count.to_bytes(4, "big") + b"\x80" * count
    assert "more than 65536 items" in refused(wire.post(f"{wire.attested_url}/run", bomb))
    _still_serving(wire)


def _still_serving(wire: BlindAIWire) -> None:
    model = add_mul_model().SerializeToString()
    model_id = ok(wire.upload(model))["model_id"]
    answer = ok(wire.run([tensor(A, 0, "a"), tensor(B, 0, "b")], model_id=model_id))
    assert len(answer["outputs"]) == 2
    ok(wire.delete(model_id))


@pytest.fixture
def add_mul_id(wire: BlindAIWire) -> Iterator[str]:
    model_id = ok(wire.upload(add_mul_model().SerializeToString()))["model_id"]
    yield model_id
    wire.delete(model_id)


@pytest.mark.parametrize("datum_type", [99, -1, "F16", "float32", True, None, 2.5, [0]])
def test_wrong_datum_type(wire: BlindAIWire, add_mul_id: str, datum_type: Any) -> None:
    inputs = [tensor(A, 0, "a"), tensor(B, 0, "b")]
    inputs[0]["info"]["datum_type"] = datum_type
    message = refused(wire.run(inputs, model_id=add_mul_id))
    assert "datum_type" in message and "F32=0" in message


def test_a_datum_type_the_model_does_not_take(wire: BlindAIWire, add_mul_id: str) -> None:
    message = refused(wire.run([tensor(A, 1, "a"), tensor(B, 0, "b")], model_id=add_mul_id))
    assert "FP64" in message and "FP32" in message


@pytest.mark.parametrize(
    ("model_id", "model_hash", "expected"),
    [
        ("ID", "a" * 64, "exactly one"),
        ("", "", "exactly one"),
        ("", "zz", "64 hex"),
        (str(uuid.uuid4()), "", "no public model"),
        ("", hashlib.sha256(b"unknown").hexdigest(), "no public model"),
        ("x" * 10000, "", "no public model"),
    ],
)
def test_model_reference_errors(
    wire: BlindAIWire, add_mul_id: str, model_id: str, model_hash: str, expected: str
) -> None:
    model_id = add_mul_id if model_id == "ID" else model_id
    message = refused(wire.run([tensor(A), tensor(B)], model_id=model_id, model_hash=model_hash))
    assert expected in message
    assert len(message) < 400


def test_tensor_errors(wire: BlindAIWire, add_mul_id: str) -> None:
    short = tensor(A, 0, "a")
    short["bytes_data"] = short["bytes_data"][:-1]
    assert "needs 32 bytes" in refused(wire.run([short, tensor(B, 0, "b")], model_id=add_mul_id))
    twice = [tensor(A, 0, "a"), tensor(B, 0, "a")]
    assert "twice" in refused(wire.run(twice, model_id=add_mul_id))
    assert "missing" in refused(wire.run([tensor(A, 0, "a")], model_id=add_mul_id))
    three = [tensor(A), tensor(B), tensor(B)]
    assert "only 2 inputs" in refused(wire.run(three, model_id=add_mul_id))
    secret = np.full((2, 4), 1234.5678, dtype=np.float32)
    wrong_shape = [tensor(secret.reshape(8), 0, "a"), tensor(B, 0, "b")]
    message = refused(wire.run(wrong_shape, model_id=add_mul_id))
    assert "shape" in message and "1234" not in message  # never tensor contents
    bad_bool = tensor(np.array([True]), 10, "a")
    bad_bool["bytes_data"] = b"\x07"
    assert "0 or 1" in refused(wire.run([bad_bool, tensor(B, 0, "b")], model_id=add_mul_id))
    not_bytes = tensor(A, 0, "a")
    not_bytes["bytes_data"] = list(not_bytes["bytes_data"])
    assert "bytes_data" in refused(wire.run([not_bytes, tensor(B, 0, "b")], model_id=add_mul_id))
    _still_serving(wire)


def test_upload_errors(wire: BlindAIWire) -> None:
    model = add_mul_model().SerializeToString()
    assert "length" in refused(wire.upload(model, length=len(model) + 1))
    not_bytes = cbor2.dumps({"model": [*list(model)[:-1], 256], "length": len(model)})
    assert "0 to 255" in refused(wire.post(f"{wire.management_url}/upload", not_bytes))
    negative = cbor2.dumps({"model": [1, -1, 2], "length": 3})
    assert "0 to 255" in refused(wire.post(f"{wire.management_url}/upload", negative))
    assert "onnx" in refused(wire.upload(b"not an onnx model")).lower()
    # Limits are the main API's: --max-model-bytes 100000 on this server, checked from the
    # array's declared length, before decoding it.
    too_big = b"\xa1\x65model\x9a" + (100001).to_bytes(4, "big")
    assert "--max-model-bytes" in refused(wire.post(f"{wire.management_url}/upload", too_big))
    huge_body = cbor2.dumps({"model": bytes(300000)})
    assert "--max-model-bytes" in refused(wire.post(f"{wire.management_url}/upload", huge_body))
    _still_serving(wire)


def test_blindai_models_persist_in_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = add_mul_model().SerializeToString()
    server = start_server(tmp_path, "--open-upload", "--store", str(store), *_ports())
    try:
        model_id = ok(BlindAIWire(compat_ports(server), tmp_path).upload(model))["model_id"]
    finally:
        server.stop()
    server = start_server(tmp_path, "--open-upload", "--store", str(store), *_ports())
    try:
        wire = BlindAIWire(compat_ports(server), tmp_path)
        answer = ok(wire.run([tensor(A), tensor(B)], model_id=model_id))
        assert len(answer["outputs"]) == 2
        ok(wire.delete(model_id))
    finally:
        server.stop()
    server = start_server(tmp_path, "--open-upload", "--store", str(store), *_ports())
    try:
        wire = BlindAIWire(compat_ports(server), tmp_path)
        assert "no public model" in refused(wire.run([tensor(A), tensor(B)], model_id=model_id))
    finally:
        server.stop()


# --- the upload policy ---


def test_an_upload_key_server_refuses_blindai_uploads(tmp_path: Path) -> None:
    key = "k" * 32
    keys = tmp_path / "keys.txt"
    keys.write_text(f"sha256:{hashlib.sha256(key.encode()).hexdigest()}\n")
    server = start_server(tmp_path, "--upload-key-file", str(keys), *_ports())
    try:
        wire = BlindAIWire(compat_ports(server), tmp_path)
        model = add_mul_model().SerializeToString()
        message = refused(wire.upload(model))
        assert "upload key" in message and "--unsafe-blindai-upload-without-key" in message
        assert "upload key" in refused(wire.delete(str(uuid.uuid4())))
        # The way to migrate: upload with Blindfold, run here by hash.
        with _sdk(server, token=key) as client:
            uploaded = client.upload_model(model, name="add-mul", public=True)
        answer = ok(wire.run([tensor(A), tensor(B)], model_hash=uploaded.sha256))
        assert len(answer["outputs"]) == 2
        assert "refused (this server needs an upload key)" in server.log()
    finally:
        server.stop()


def test_the_operator_can_accept_keyless_blindai_uploads(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"sha256:{hashlib.sha256(b'k' * 32).hexdigest()}\n")
    server = start_server(
        tmp_path,
        "--upload-key-file",
        str(keys),
        "--unsafe-blindai-upload-without-key",
        *_ports(),
    )
    try:
        wire = BlindAIWire(compat_ports(server), tmp_path)
        model_id = ok(wire.upload(add_mul_model().SerializeToString()))["model_id"]
        ok(wire.delete(model_id))
        assert "UNSAFE" in server.log()
    finally:
        server.stop()


def test_the_unsafe_flag_needs_blindai_compat(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="needs --blindai-compat"):
        start_server(tmp_path, "--open-upload", "--unsafe-blindai-upload-without-key")


def test_ports_in_use_fail_the_start_clearly(tmp_path: Path) -> None:
    ports = _ports()
    taken = int(ports[ports.index("--blindai-attested-port") + 1])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        with pytest.raises(RuntimeError, match="--blindai-attested-port") as failed:
            start_server(tmp_path, "--open-upload", *ports)
    assert "Traceback" not in str(failed.value)
    same = ["--blindai-compat", "--blindai-management-port", "9999"]
    with pytest.raises(RuntimeError, match="four different ports"):
        start_server(tmp_path, "--open-upload", *same, port=9999)


# --- the bulk decoder of BlindAI's model arrays ---


@pytest.mark.parametrize("chunk", [3, 64, blindai_compat.CHUNK])
def test_model_arrays_decode_as_cbor2_does(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(blindai_compat, "CHUNK", chunk)
    rng = np.random.default_rng(7)
    samples = [
        b"",
        bytes([24] * 7),
        bytes([24, 25, 24, 24, 23, 0, 255, 24]),
        rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        rng.choice(np.array([0, 23, 24, 25, 255], dtype=np.uint8), 5000).tobytes(),
    ]
    for model in samples:
        body = cbor2.dumps({"model": list(model), "length": len(model), "after": [24, 25]})
        decoded, fields = read_upload(body, 1 << 20)
        assert decoded == model
        assert fields == {"length": len(model), "after": [24, 25]}
    # Non-shortest forms of small values (0x18 0x05) mean what cbor2 says they mean.
    assert CborReader(b"\x18\x05\x18\x18\x01").byte_values(0, 3) == (b"\x05\x18\x01", 5)
    with pytest.raises(blindfold.errors.RequestRejected, match="0 to 255"):
        CborReader(b"\x19\x00\x05").byte_values(0, 1)
