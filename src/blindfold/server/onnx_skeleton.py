"""The skeleton of an ONNX model: its protobuf serialization with every tensor's weights
emptied, rebuilt from a view of the model without copying the weights.

The ONNX checker (`onnx_check`) needs every name, type, shape, attribute, subgraph, function
and tensor header of an uploaded model, never the weights. Python's protobuf offers no lazy or
zero-copy parse: `ParseFromString` copies every `TensorProto.raw_data` into its own memory (and
copies a memoryview into `bytes` first), so checking a model held in a memfd would cost twice
its size. This module is therefore a small, hand-written walker of the protobuf wire format,
driven by the ONNX descriptors: it reads a memoryview (a mapping of the sealed memfd) and
writes the same message tree, with the same fields in the same order, except that
`TensorProto.raw_data` becomes an empty field of the same number (so `HasField` still holds)
and the packed numeric payloads (`float_data`, `int32_data`, `int64_data`, `double_data`,
`uint64_data`) are left out. `ParseFromString` of that skeleton then gives the model the
checks read, at a cost of its headers only.

Why the verdict is protobuf's own: the walker copies bytes unchanged wherever it can (scalar
fields, strings, messages that cannot hold a tensor, messages too short to matter, whatever
follows a group), so protobuf parses them in the skeleton exactly as in the model, at the same
nesting depth. Only what it leaves out is checked here, by protobuf's (upb's) rules: tags
(at most 5 bytes, below 2**32, field number not 0, wire types 0, 1, 2, 5 or a group), lengths
(at most 5 bytes, within the enclosing message), packed payloads (whole fixed-size elements,
varints of at most 10 bytes) and nesting (at most 100 messages below the model). Unknown
length-delimited fields, which protobuf never looks into and the checks never read, are left
out. Anything else refused raises `MalformedModel`, without reading further and without
allocating more than the skeleton so far. A model with more fields to walk than MAX_STEPS (no
exporter writes one) is returned whole, for protobuf to parse as it did before this walker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx
from google.protobuf.descriptor import Descriptor, FieldDescriptor

# protobuf's default recursion limit (upb's kUpb_WireFormat_DefaultDepthLimit): messages nested
# below the root; one more is a parse error.
MAX_DEPTH = 100

# A message field that could hold a tensor is walked only when longer than this; shorter ones
# are copied as they are (they hold at most this many bytes of weights). Walking every small
# node of a large graph would cost Python time for no memory saved.
VERBATIM_BELOW = 256

# At most this many steps of the walk (a field, or a run of scalar fields): about two seconds
# of Python. An ONNX exporter writes far fewer (a node or a tensor is one field of its
# graph, a tensor a handful), but a crafted model could hold hundreds of millions of empty
# fields; such a model is handed to protobuf whole instead, costing what it did before.
MAX_STEPS = 4_000_000

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_SGROUP, _WIRE_EGROUP, _WIRE_FIXED32 = range(6)


class MalformedModel(ValueError):
    """The bytes are not a protobuf message protobuf's own parser would accept."""


class _TooManyFields(Exception):
    """More than MAX_STEPS fields to walk one by one."""


class _Malformed(Exception):
    """Raised inside the walk; turned into MalformedModel by `skeleton` outside its handler,
    so that no traceback keeps the walk's frames (and the caller's mapping) alive."""


# What the walker does with a length-delimited field of a known number.
_KEEP = 0  # copy it as it is
_WALK = 1  # a message that could hold a tensor: walk it (when long enough)
_EMPTY = 2  # TensorProto.raw_data: an empty field of the same number
_PACKED_FIXED32 = 3  # packed payloads, left out once checked
_PACKED_FIXED64 = 4
_PACKED_VARINT = 5


@dataclass
class _Plan:
    """The walker's actions for one message type, by field number."""

    actions: dict[int, int] = field(default_factory=dict)
    children: dict[int, _Plan] = field(default_factory=dict)


_PAYLOAD_KINDS = {
    FieldDescriptor.TYPE_FLOAT: _PACKED_FIXED32,
    FieldDescriptor.TYPE_FIXED32: _PACKED_FIXED32,
    FieldDescriptor.TYPE_SFIXED32: _PACKED_FIXED32,
    FieldDescriptor.TYPE_DOUBLE: _PACKED_FIXED64,
    FieldDescriptor.TYPE_FIXED64: _PACKED_FIXED64,
    FieldDescriptor.TYPE_SFIXED64: _PACKED_FIXED64,
    FieldDescriptor.TYPE_INT32: _PACKED_VARINT,
    FieldDescriptor.TYPE_INT64: _PACKED_VARINT,
    FieldDescriptor.TYPE_UINT32: _PACKED_VARINT,
    FieldDescriptor.TYPE_UINT64: _PACKED_VARINT,
    FieldDescriptor.TYPE_SINT32: _PACKED_VARINT,
    FieldDescriptor.TYPE_SINT64: _PACKED_VARINT,
}
# The TensorProto fields that hold weights; nothing the checker reads is among them.
_PAYLOAD_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


def _plans(root: Descriptor) -> _Plan:
    """Plans for `root` and every message type below it, from the descriptors, so that a
    tensor anywhere (a field added to ONNX later included) is found."""
    types: dict[str, Descriptor] = {}
    pending = [root]
    while pending:
        descriptor = pending.pop()
        if descriptor.full_name in types:
            continue
        types[descriptor.full_name] = descriptor
        pending.extend(f.message_type for f in descriptor.fields if f.message_type is not None)
    tensor = onnx.TensorProto.DESCRIPTOR.full_name
    holds_tensor = {tensor}
    changed = True
    while changed:  # which types can reach a TensorProto
        changed = False
        for name, descriptor in types.items():
            if name not in holds_tensor and any(
                f.message_type is not None and f.message_type.full_name in holds_tensor
                for f in descriptor.fields
            ):
                holds_tensor.add(name)
                changed = True
    plans = {name: _Plan() for name in holds_tensor}
    for name, plan in plans.items():
        descriptor = types[name]
        for f in descriptor.fields:
            if name == tensor and f.name in _PAYLOAD_FIELDS:
                plan.actions[f.number] = (
                    _EMPTY if f.type == FieldDescriptor.TYPE_BYTES else _PAYLOAD_KINDS[f.type]
                )
            elif f.message_type is not None and f.message_type.full_name in holds_tensor:
                plan.actions[f.number] = _WALK
                plan.children[f.number] = plans[f.message_type.full_name]
            else:
                plan.actions[f.number] = _KEEP
    return plans[root.full_name]


_MODEL_PLAN = _plans(onnx.ModelProto.DESCRIPTOR)


def _byte_class(values: list[int]) -> bytes:
    return b"[" + b"".join(re.escape(bytes([value])) for value in values) + b"]"


def _tag_pattern(wire: int) -> bytes:
    # A one-byte tag (field number 1-15), or a 2-4 byte tag whose last byte is not zero (so its
    # field number is at least 16 and below 2**25): tags protobuf accepts, and nothing else.
    short = _byte_class([b for b in range(8, 0x80) if b & 7 == wire])
    long = _byte_class([b for b in range(0x80, 0x100) if b & 7 == wire])
    return b"(?:" + short + b"|" + long + rb"[\x80-\xff]{0,2}[\x01-\x7f])"


# A run of scalar fields (varint, fixed64, fixed32), all copied as they are. Matched by `re`,
# in C, so that a message of millions of scalar fields does not cost a Python step each.
_SCALAR_RUN = re.compile(
    b"(?:"
    + _tag_pattern(_WIRE_VARINT)
    + rb"[\x80-\xff]{0,9}[\x00-\x7f]|"
    + _tag_pattern(_WIRE_FIXED64)
    + b".{8}|"
    + _tag_pattern(_WIRE_FIXED32)
    + b".{4}){1,4096}+",
    re.DOTALL,
)
# A varint longer than 10 bytes: protobuf refuses it.
_OVERLONG_VARINT = re.compile(rb"[\x80-\xff]{10}")


def skeleton(
    data: bytes | memoryview, verbatim_below: int = VERBATIM_BELOW, max_steps: int = MAX_STEPS
) -> bytes:
    """The serialization of the ModelProto in `data` with its weights emptied; raises
    MalformedModel where protobuf's parse of `data` would fail on what the skeleton leaves
    out. `data` is only read, through views released before this returns."""
    out = bytearray()
    with memoryview(data) as view:
        try:
            _Walk(view, verbatim_below, max_steps).message(0, len(view), _MODEL_PLAN, 0, out)
            malformed = False
        except _Malformed:
            malformed = True
        except _TooManyFields:
            # Handed to protobuf whole, as before this walker existed: protobuf's parse, in
            # C, is faster than walking so many fields in Python; memory is what it was.
            return bytes(view)
    if malformed:
        raise MalformedModel("not a protobuf message (the wire format is malformed)")
    return bytes(out)


def _varint(view: memoryview, pos: int, end: int, limit: int) -> tuple[int, int]:
    """The varint at `pos` (at most `limit` bytes) and the position after it."""
    value = 0
    shift = 0
    stop = min(end, pos + limit)
    while pos < stop:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Malformed


class _Walk:
    """One walk over `view`, with its step budget."""

    def __init__(self, view: memoryview, verbatim_below: int, max_steps: int) -> None:
        self.view = view
        self.verbatim_below = verbatim_below
        self.steps = max_steps

    def message(self, pos: int, end: int, plan: _Plan, depth: int, out: bytearray) -> None:
        """Appends the skeleton of the message in view[pos:end] to `out`."""
        view = self.view
        actions = plan.actions
        kept = pos  # start of the bytes not yet copied, all to be copied as they are
        while pos < end:
            self.steps -= 1
            if self.steps < 0:
                raise _TooManyFields
            start = pos
            byte = view[pos]
            if byte < 0x80:
                tag = byte
                pos += 1
            else:
                tag, pos = _varint(view, pos, end, 5)
                if tag > 0xFFFFFFFF:
                    raise _Malformed
            number = tag >> 3
            wire = tag & 7
            if number == 0:
                raise _Malformed
            if wire == _WIRE_LEN:
                tag_end = pos
                length, body = _varint(view, pos, end, 5)
                pos = body + length
                if pos > end:
                    raise _Malformed
                action = actions.get(number)
                if action == _KEEP or (action == _WALK and length < self.verbatim_below):
                    continue
                out += view[kept:start]
                kept = pos
                if action is None:  # unknown: protobuf keeps it unread, the checks never read it
                    continue
                if action == _WALK:
                    if depth >= MAX_DEPTH:
                        raise _Malformed
                    child = bytearray()
                    self.message(body, pos, plan.children[number], depth + 1, child)
                    out += view[start:tag_end]
                    out += _encode_varint(len(child))
                    out += child
                elif action == _EMPTY:
                    out += view[start:tag_end]
                    out.append(0)
                else:
                    _check_packed(view, body, pos, action)
            elif wire == _WIRE_VARINT:
                _, pos = _varint(view, pos, end, 10)
            elif wire in (_WIRE_FIXED64, _WIRE_FIXED32):
                pos += 8 if wire == _WIRE_FIXED64 else 4
                if pos > end:
                    raise _Malformed
            elif wire == _WIRE_SGROUP:
                # No ONNX field is a group: an unknown one. The rest of this message is copied
                # as it is, and protobuf checks the group's nesting and end in the skeleton.
                pos = end
                break
            else:  # an end of group outside any group, or wire types 6 and 7
                raise _Malformed
            if wire != _WIRE_LEN:
                run = _SCALAR_RUN.match(view, pos, end)
                while run is not None:
                    self.steps -= 1
                    pos = run.end()
                    run = _SCALAR_RUN.match(view, pos, end)
        out += view[kept:end]


def _check_packed(view: memoryview, pos: int, end: int, kind: int) -> None:
    """A packed payload left out of the skeleton: whole elements, as protobuf requires."""
    length = end - pos
    if kind == _PACKED_FIXED32:
        if length % 4:
            raise _Malformed
    elif kind == _PACKED_FIXED64:
        if length % 8:
            raise _Malformed
    elif length and (view[end - 1] >= 0x80 or _OVERLONG_VARINT.search(view, pos, end)):
        raise _Malformed


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
