"""Reading a request the protobuf parser refused: which field's bytes are at fault, from the wire format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor


@dataclass(frozen=True)
class Undecodable:
    """A request the protobuf parser refused (e.g. a string field that is not UTF-8); `field` names it."""

    field: str


def tolerant(deserialize: Callable[[bytes], Any], message: descriptor.Descriptor) -> Callable[[bytes], Any]:
    """A deserializer that turns a parse failure into `Undecodable` instead of grpc's INTERNAL."""

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return Undecodable(field=_bad_field(message, data) or message.name)

    return parse


def _bad_field(message: descriptor.Descriptor, data: bytes, prefix: str = "") -> str:
    """The dotted name of the first field whose bytes do not parse (walks the wire format)."""
    position, name = 0, prefix.rstrip(".")
    try:
        while position < len(data):
            tag, position = _varint(data, position)
            field = message.fields_by_number.get(tag >> 3)
            name = prefix + field.name if field is not None else prefix.rstrip(".")
            wire_type = tag & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type in (1, 5):
                position += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                chunk, position = data[position : position + length], position + length
                if len(chunk) < length:
                    return name
                if field is not None and field.type == descriptor.FieldDescriptor.TYPE_STRING:
                    chunk.decode("utf-8")
                elif field is not None and field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                    inner = _bad_field(field.message_type, chunk, f"{name}.")
                    if inner:
                        return inner
            else:
                return name
    except (IndexError, UnicodeDecodeError):
        return name
    return ""


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
