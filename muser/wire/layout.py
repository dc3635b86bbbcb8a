"""Declare a wire layout once: a frozen dataclass whose fields carry construct subcons.

`@layout` turns the class into a dataclass, builds the `construct.Struct` from the
fields in order, and, when every field is a plain integer or fixed-size bytes
(optionally followed by one trailing `GreedyBytes`), derives a `struct.Struct` from
that same declaration for the hot path. Tests check that both paths agree.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, TypeVar, cast, dataclass_transform

import construct as cs

from muser.errors import ProtocolError

_L = TypeVar("_L", bound="Layout")


def wire(subcon: Any) -> Any:
    """Declare a layout field by its construct subcon (fields are laid out in order)."""
    return dataclasses.field(metadata={"subcon": subcon})


class _ValuesGetter(Protocol):
    def __call__(self, obj: Any, /) -> tuple[Any, ...]: ...


class Layout:
    """Base of every payload layout: `parse` untrusted bytes, `build` them back."""

    __slots__ = ()

    STRUCT: ClassVar[cs.Struct]
    """The construct declaration, ending with `Terminated` so sizes are exact."""
    CODEC: ClassVar[struct.Struct | None]
    """The fixed-size prefix as a `struct.Struct`, when the layout allows one."""
    HAS_TAIL: ClassVar[bool]
    """Whether the last field takes all remaining bytes."""
    SIZE: ClassVar[int]
    """Bytes of the fixed-size fields that lead the layout (all of it, if fixed)."""
    FIELDS: ClassVar[tuple[str, ...]]
    VALUES: ClassVar[_ValuesGetter]
    """The field values of an instance, in order (one C call)."""

    if TYPE_CHECKING:

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    @classmethod
    def parse(cls, payload: bytes | bytearray | memoryview) -> Self:
        """Decode exactly `payload`; anything that does not fit raises ProtocolError."""
        codec = cls.CODEC
        if codec is not None:
            size = codec.size
            length = len(payload)
            if length < size or (length > size and not cls.HAS_TAIL):
                raise ProtocolError(
                    f"{cls.__name__} payload is {length} bytes, expected "
                    f"{'at least ' if cls.HAS_TAIL else ''}{size}"
                )
            values = codec.unpack_from(payload)
            if cls.HAS_TAIL:
                return cls(*values, bytes(payload[size:]))
            return cls(*values)
        try:
            parsed = cls.STRUCT.parse(bytes(payload))
        except cs.ConstructError as exc:
            raise ProtocolError(f"malformed {cls.__name__}: {exc}") from None
        return cls(**{name: parsed[name] for name in cls.FIELDS})

    def build_parts(self) -> tuple[bytes, ...]:
        """`build`, but with the tail (often megabytes of data) left as its own
        part, so that sending it with the rest copies it no more."""
        if self.HAS_TAIL and self.CODEC is not None:
            values = type(self).VALUES(self)
            tail = values[-1]
            try:
                return self.CODEC.pack(*values[:-1]), tail if type(tail) is bytes else bytes(tail)
            except struct.error as exc:
                raise ValueError(f"cannot build {type(self).__name__}: {exc}") from None
        return (self.build(),)

    def build(self) -> bytes:
        """Encode to bytes; a value out of its field's range raises ValueError."""
        codec = self.CODEC
        if codec is not None:
            values = type(self).VALUES(self)
            try:
                if self.HAS_TAIL:
                    return codec.pack(*values[:-1]) + bytes(values[-1])
                return codec.pack(*values)
            except struct.error as exc:
                raise ValueError(f"cannot build {type(self).__name__}: {exc}") from None
        try:
            return self.STRUCT.build({name: getattr(self, name) for name in self.FIELDS})
        except cs.ConstructError as exc:
            raise ValueError(f"cannot build {type(self).__name__}: {exc}") from None


def joined_codec(*layouts: type[Layout]) -> struct.Struct:
    """One `struct.Struct` for the fixed fields of several layouts back to back (a
    header and the start of its payload), so a hot path packs a message in one call."""
    formats = []
    for each in layouts:
        codec = each.CODEC
        if codec is None or each.HAS_TAIL:
            raise TypeError(f"{each.__name__} is not all fixed-size fields")
        formats.append(codec.format.removeprefix("<"))
    return struct.Struct("<" + "".join(formats))


def prefix_codec(layout: type[Layout]) -> struct.Struct:
    """The fixed fields ahead of a layout's variable part (a bytes tail, an array),
    for code that unpacks them in one call: a hot path taking its tail (bulk data) as
    a slice of its own, or a reader that must learn a count before the rest."""
    if layout.CODEC is not None and not layout.HAS_TAIL:
        raise TypeError(f"{layout.__name__} has no variable part")
    formats = []
    for renamed in layout.STRUCT.subcons[:-1]:  # each field, then Terminated
        fmt = _fast_format(cast(Any, renamed).subcon)
        if fmt is None:
            break
        formats.append(fmt)
    return struct.Struct("<" + "".join(formats))


def _fast_format(subcon: Any) -> str | None:
    """The `struct` format of one fixed-size field, derived from its construct subcon."""
    if isinstance(subcon, cs.FormatField):
        fmtstr: str = subcon.fmtstr
        if fmtstr[0] != "<":
            return None
        return fmtstr[1:]
    if isinstance(subcon, cs.Bytes) and isinstance(subcon.length, int):
        return f"{subcon.length}s"
    return None


def _values_getter(names: tuple[str, ...]) -> _ValuesGetter:
    if len(names) > 1:
        return operator.attrgetter(*names)
    if names:
        single = operator.attrgetter(names[0])
        return lambda obj: (single(obj),)
    return lambda _obj: ()


def _fixed_prefix_size(subcons: list[Any]) -> int:
    """The bytes taken by the fixed-size fields before the first variable one."""
    total = 0
    for subcon in subcons:
        fmt = _fast_format(subcon)
        if fmt is None:
            break
        total += struct.calcsize("<" + fmt)
    return total


def _derive_codec(subcons: list[Any]) -> tuple[struct.Struct | None, bool]:
    has_tail = bool(subcons) and subcons[-1] is cs.GreedyBytes
    fixed = subcons[:-1] if has_tail else subcons
    formats = [_fast_format(subcon) for subcon in fixed]
    if any(fmt is None for fmt in formats):
        return None, has_tail
    return struct.Struct("<" + "".join(fmt for fmt in formats if fmt)), has_tail


@dataclass_transform(frozen_default=True, field_specifiers=(wire,))
def layout(cls: type[_L]) -> type[_L]:
    """Make `cls` a frozen dataclass and derive its construct and struct codecs."""
    made = dataclasses.dataclass(frozen=True, slots=True)(cls)
    fields = dataclasses.fields(cast(Any, made))
    subcons = [field.metadata["subcon"] for field in fields]
    made.FIELDS = tuple(field.name for field in fields)
    made.VALUES = _values_getter(made.FIELDS)
    made.STRUCT = cs.Struct(
        *(field.name / subcon for field, subcon in zip(fields, subcons, strict=True)),
        cs.Terminated,
    )
    made.CODEC, made.HAS_TAIL = _derive_codec(subcons)
    made.SIZE = _fixed_prefix_size(subcons)
    return made


class _Nested(cs.Adapter):  # type: ignore[type-arg]
    """A layout used as a field of another layout: parses to the typed dataclass."""

    def __init__(self, layout_cls: type[Layout]) -> None:
        struct_without_terminator = cs.Struct(*layout_cls.STRUCT.subcons[:-1])
        super().__init__(struct_without_terminator)
        self.layout_cls = layout_cls

    def _decode(self, obj: Any, context: Any, path: Any) -> Layout:
        return self.layout_cls(**{name: obj[name] for name in self.layout_cls.FIELDS})

    def _encode(self, obj: Any, context: Any, path: Any) -> dict[str, Any]:
        if not isinstance(obj, self.layout_cls):
            raise cs.ConstructError(f"expected {self.layout_cls.__name__}, got {obj!r}")
        return {name: getattr(obj, name) for name in self.layout_cls.FIELDS}


def nested(layout_cls: type[Layout]) -> Any:
    """A field holding one instance of another layout."""
    return _Nested(layout_cls)


def array_of(count: Callable[[Any], int], layout_cls: type[Layout]) -> Any:
    """A field holding `count(context)` instances of another layout, as a tuple."""
    return cs.ExprAdapter(
        cs.Array(count, _Nested(layout_cls)),
        decoder=lambda obj, _ctx: tuple(obj),
        encoder=lambda obj, _ctx: list(obj),
    )
