"""Binary HTTP and Oblivious HTTP framing (blindfold.ohttp) against the RFCs' own vectors:
RFC 9292 section 5 (Figures 8, 9, 11 and 13) and RFC 9458 Appendix A."""

from __future__ import annotations

import contextlib

import pytest

from blindfold import hpke, ohttp
from blindfold.ohttp import BinaryRequest, BinaryResponse, KeyConfig, OhttpError

# RFC 9292 Figure 8: GET /hello.txt with three header fields, known length.
FIG8 = bytes.fromhex(
    "0003474554056874747073000a2f68656c6c6f2e747874406c0a757365722d6167656e74346375726c2f37"
    "2e31362e33206c69626375726c2f372e31362e33204f70656e53534c2f302e392e376c207a6c69622f312e"
    "322e3304686f73740f7777772e6578616d706c652e636f6d0f6163636570742d6c616e677561676506656e"
    "2c206d690000"
)
# Figure 9: the same request, indeterminate length, with padding.
FIG9 = bytes.fromhex(
    "0203474554056874747073000a2f68656c6c6f2e7478740a757365722d6167656e74346375726c2f372e31"
    "362e33206c69626375726c2f372e31362e33204f70656e53534c2f302e392e376c207a6c69622f312e322e"
    "3304686f73740f7777772e6578616d706c652e636f6d0f6163636570742d6c616e677561676506656e2c20"
    "6d6900000000000000000000000000"
)
# Figure 11: indeterminate-length response with 102 and 103 informational responses.
FIG11 = bytes.fromhex(
    "0340660772756e6e696e670a22736c65657020313522004067046c696e6b233c2f7374796c652e6373733e"
    "3b2072656c3d7072656c6f61643b2061733d7374796c65046c696e6b243c2f7363726970742e6a733e3b20"
    "72656c3d7072656c6f61643b2061733d7363726970740040c804646174651d4d6f6e2c203237204a756c20"
    "323030392031323a32383a353320474d5406736572766572064170616368650d6c6173742d6d6f64696669"
    "65641d5765642c203232204a756c20323030392031393a31353a353620474d540465746167142233346161"
    "3338372d642d3135363865623030220d6163636570742d72616e6765730562797465730e636f6e74656e74"
    "2d6c656e67746802353104766172790f4163636570742d456e636f64696e670c636f6e74656e742d747970"
    "650a746578742f706c61696e003348656c6c6f20576f726c6421204d7920636f6e74656e7420696e636c75"
    "646573206120747261696c696e672043524c462e0d0a0000"
)
# Figure 13: known-length response with a trailer.
FIG13 = bytes.fromhex(
    "0140c8001d5468697320636f6e74656e7420636f6e7461696e732043524c462e0d0a0d07747261696c6572"
    "0474657874"
)
HELLO_HEADERS = [
    ("user-agent", "curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"),
    ("host", "www.example.com"),
    ("accept-language", "en, mi"),
]

# RFC 9458 Appendix A.
SK_R = bytes.fromhex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
KEY_CONFIG = bytes.fromhex(
    "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003"
)
REQUEST = bytes.fromhex("00034745540568747470730b6578616d706c652e636f6d012f")
SK_E = bytes.fromhex("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
PK_E = bytes.fromhex("4b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472")
ENC_REQUEST = bytes.fromhex(
    "010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472"
    "6374e469135906992e1268c594d2a10c695d858c40a026e7965e7d86b83dd440b2c0185204b4d63525"
)
RESPONSE = bytes.fromhex("0140c8")
SECRET = bytes.fromhex("62d87a6ba569ee81014c2641f52bea36")
RESPONSE_NONCE = bytes.fromhex("c789e7151fcba46158ca84b04464910d")
ENC_RESPONSE = bytes.fromhex(
    "c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd"
)


def test_figure_8_decodes_and_is_reproduced_byte_for_byte() -> None:
    request = ohttp.decode_request(FIG8)
    assert (request.method, request.scheme, request.authority, request.path) == (
        "GET",
        "https",
        "",
        "/hello.txt",
    )
    assert request.headers == HELLO_HEADERS and request.body == b"" and request.trailers == []
    assert ohttp.encode_request(BinaryRequest("GET", "/hello.txt", HELLO_HEADERS)) == FIG8


def test_figure_9_indeterminate_length_with_padding_means_the_same_request() -> None:
    assert ohttp.decode_request(FIG9) == ohttp.decode_request(FIG8)
    # Truncating the empty trailing sections changes nothing (RFC 9292 section 3.8).
    assert ohttp.decode_request(FIG8[:-2]) == ohttp.decode_request(FIG8)


def test_figure_11_informational_responses_then_the_final_one() -> None:
    response = ohttp.decode_response(FIG11)
    assert [status for status, _ in response.informational] == [102, 103]
    assert response.informational[0][1] == [("running", '"sleep 15"')]
    assert response.status == 200
    assert ("content-type", "text/plain") in response.headers
    assert response.body == b"Hello World! My content includes a trailing CRLF.\r\n"


def test_figure_13_response_with_trailer_round_trips() -> None:
    response = ohttp.decode_response(FIG13)
    assert response.status == 200 and response.trailers == [("trailer", "text")]
    assert response.body == b"This content contains CRLF.\r\n"
    assert ohttp.encode_response(response) == FIG13
    assert ohttp.decode_response(RESPONSE) == BinaryResponse(200)


def test_appendix_a_key_configuration() -> None:
    config = KeyConfig.decode(KEY_CONFIG)
    assert config.key_id == 1 and config.symmetric == ((1, 1), (1, 3))
    assert config.encode() == KEY_CONFIG
    with pytest.raises(OhttpError, match="truncated"):
        KeyConfig.decode(KEY_CONFIG[:-1])
    with pytest.raises(OhttpError, match="after"):
        KeyConfig.decode(KEY_CONFIG + b"\x00")


def test_appendix_a_gateway_opens_the_request_and_seals_the_published_response() -> None:
    private_key = hpke.KeyPair.from_private_bytes(SK_R)
    request, context = ohttp.decapsulate_request(private_key, ENC_REQUEST)
    assert request == REQUEST and context.enc == PK_E and context.secret == SECRET
    decoded = ohttp.decode_request(request)
    assert (decoded.method, decoded.authority, decoded.path) == ("GET", "example.com", "/")
    sealed = ohttp.encapsulate_response(context, RESPONSE, response_nonce=RESPONSE_NONCE)
    assert sealed == ENC_RESPONSE


def test_appendix_a_client_produces_the_published_request_and_opens_the_response() -> None:
    ephemeral = hpke.KeyPair.from_private_bytes(SK_E)
    assert ephemeral.public_key == PK_E
    message, context = ohttp.encapsulate_request(
        KeyConfig.decode(KEY_CONFIG), REQUEST, ephemeral=ephemeral
    )
    assert message == ENC_REQUEST and context.secret == SECRET
    assert ohttp.decapsulate_response(context, ENC_RESPONSE) == RESPONSE


def test_altered_or_misdirected_messages_are_refused() -> None:
    private_key = hpke.KeyPair.from_private_bytes(SK_R)
    flipped = bytearray(ENC_REQUEST)
    flipped[-1] ^= 1
    with pytest.raises(OhttpError, match="does not decrypt"):
        ohttp.decapsulate_request(private_key, bytes(flipped))
    with pytest.raises(OhttpError, match="shorter"):
        ohttp.decapsulate_request(private_key, ENC_REQUEST[:40])
    other = hpke.KeyPair.derive(b"\x07" * 32)
    with pytest.raises(OhttpError, match="does not decrypt"):
        ohttp.decapsulate_request(other, ENC_REQUEST)
    _, context = ohttp.decapsulate_request(private_key, ENC_REQUEST)
    with pytest.raises(OhttpError, match="does not decrypt"):
        ohttp.decapsulate_response(ohttp.ClientContext(context.enc, bytes(16)), ENC_RESPONSE)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"", "truncated"),
        (b"\x05", "not a binary HTTP request"),
        (b"\x01" + FIG8[1:], "not a binary HTTP request"),
        (FIG8[:40], "truncated"),
        (FIG8[:8], "truncated"),
        (FIG8 + b"\x00\x01", "padding"),
        (bytes.fromhex("000347455405687474707300012f") + bytes.fromhex("bfffffff"), "truncated"),
    ],
)
def test_invalid_requests_are_refused_with_what_was_wrong(message: bytes, match: str) -> None:
    with pytest.raises(OhttpError, match=match):
        ohttp.decode_request(message)


def test_random_garbage_only_ever_raises_ohttp_error() -> None:
    import random

    generator = random.Random(9292)  # noqa: S311 (reproducible fuzzing, not a secret)
    for _ in range(3000):
        base = bytearray(generator.choice([FIG8, FIG9, FIG11, FIG13, REQUEST]))
        for _ in range(generator.randint(1, 4)):
            base[generator.randrange(len(base))] = generator.randrange(256)
        cut = bytes(base[: generator.randrange(len(base) + 1)])
        for decode in (ohttp.decode_request, ohttp.decode_response):
            for data in (bytes(base), cut):
                with contextlib.suppress(OhttpError):
                    decode(data)


def test_padding_buckets() -> None:
    assert ohttp.padded_length(10) == 1024
    assert ohttp.padded_length(1025) == 2048
    assert ohttp.padded_length(100_000) == 128 << 10
    assert ohttp.padded_length((1 << 20) + 1) == 2 << 20
    assert ohttp.padded_length(10, (64, 512)) == 64
    padded = ohttp.encode_request(BinaryRequest("POST", "/x", body=b"hi"), ohttp.DEFAULT_BUCKETS)
    assert len(padded) == 1024 and ohttp.decode_request(padded).body == b"hi"
    body = bytes(range(256)) * 20
    padded = ohttp.encode_response(BinaryResponse(200, body=body), ohttp.DEFAULT_BUCKETS)
    assert len(padded) == 8192 and ohttp.decode_response(padded).body == body
