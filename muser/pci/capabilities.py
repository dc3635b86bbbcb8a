"""PCI capabilities as declarations (protocol.md §6.4-§6.10).

A device lists what it has (`Msi(vectors=4)`, `PciExpress()`, ...); each
declaration knows its bytes and which of its bits software may write, so config
space gets every bit right without the author spelling out masks. Register
offsets named here (`Msi.CONTROL`, ...) are relative to the capability's start;
where a capability was placed is `device.config.offset_of(capability)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Protocol

MSI_VECTOR_COUNTS = (1, 2, 4, 8, 16, 32)
MAX_MSIX_VECTORS = 2048
MAX_LINK_SPEED = 5
"""Link speeds are encoded 1 (2.5 GT/s) … 5 (32 GT/s)."""
LINK_WIDTHS = (1, 2, 4, 8, 12, 16, 32)
MAX_PAYLOAD_SIZES = (128, 256, 512, 1024, 2048, 4096)


class CapId(IntEnum):
    """Standard capability IDs muser can declare."""

    POWER_MANAGEMENT = 0x01
    MSI = 0x05
    VENDOR_SPECIFIC = 0x09
    PCI_EXPRESS = 0x10
    MSIX = 0x11


class ExtCapId(IntEnum):
    """Extended capability IDs muser can declare."""

    DEVICE_SERIAL_NUMBER = 0x03
    VENDOR_SPECIFIC = 0x0B


class PowerState(IntEnum):
    D0 = 0
    D1 = 1
    D2 = 2
    D3HOT = 3


class PcieType(IntEnum):
    """The device/port types QEMU's vfio-user-pci accepts."""

    ENDPOINT = 0
    LEGACY_ENDPOINT = 1
    RC_INTEGRATED_ENDPOINT = 9


class Image:
    """A capability's bytes and access masks, before it is placed and chained."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.writable = bytearray(size)
        self.write_clears = bytearray(size)

    def set(
        self, offset: int, size: int, value: int, *, writable: int = 0, write_clears: int = 0
    ) -> None:
        end = offset + size
        self.data[offset:end] = value.to_bytes(size, "little")
        self.writable[offset:end] = writable.to_bytes(size, "little")
        self.write_clears[offset:end] = write_clears.to_bytes(size, "little")


class Registers(Protocol):
    """What a capability's post-write fixup may touch: config space registers."""

    def register(self, offset: int, size: int) -> int: ...

    def set_register(self, offset: int, size: int, value: int) -> None: ...


def _touches(offset: int, data: bytes, register: int, size: int) -> bool:
    return offset < register + size and register < offset + len(data)


@dataclass(frozen=True, eq=False)
class Capability:
    """A standard capability (in 0x40-0xFF). `offset` pins it; otherwise it goes
    after the previous one. Chained in the order the device lists them."""

    cap_id: ClassVar[int]
    offset: int | None = field(default=None, kw_only=True)

    @property
    def size(self) -> int:
        """Bytes the capability occupies in config space."""
        raise NotImplementedError

    def image(self) -> Image:
        """Bytes from the capability ID on; `next` is filled in when chained."""
        raise NotImplementedError

    def after_write(
        self, registers: Registers, base: int, before: bytes, offset: int, data: bytes
    ) -> bool:
        """Correct what a guest write of `data` at absolute `offset` left behind where
        masks can't express the rule (`before` holds the capability's bytes before
        the write). Returns True to request a function-level reset."""
        return False


@dataclass(frozen=True, eq=False)
class PowerManagement(Capability):
    """PCI Power Management 1.2. No_Soft_Reset is set: the device keeps its state
    across D3hot → D0. PowerState only takes the states the device supports;
    writing another leaves it unchanged, as the PM spec requires."""

    cap_id: ClassVar[int] = CapId.POWER_MANAGEMENT
    PMC: ClassVar[int] = 2
    PMCSR: ClassVar[int] = 4
    POWER_STATE_MASK: ClassVar[int] = 0x3
    NO_SOFT_RESET: ClassVar[int] = 0x8
    PME_ENABLE: ClassVar[int] = 0x100
    PME_STATUS: ClassVar[int] = 0x8000

    d1: bool = False
    d2: bool = False
    pme_support: int = 0
    """PME# from D0, D1, D2, D3hot, D3cold as bits 0-4."""
    aux_current: int = 0
    """The encoded 3-bit Aux_Current field (0: self-powered)."""
    device_specific_init: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.pme_support < 32 or not 0 <= self.aux_current < 8:
            raise ValueError("pme_support is 5 bits, aux_current 3 bits")

    @property
    def size(self) -> int:
        return 8

    def image(self) -> Image:
        image = Image(self.size)
        image.set(0, 1, self.cap_id)
        pmc = (
            3
            | self.device_specific_init << 5
            | self.aux_current << 6
            | self.d1 << 9
            | self.d2 << 10
            | self.pme_support << 11
        )
        image.set(self.PMC, 2, pmc)
        pme = bool(self.pme_support)
        image.set(
            self.PMCSR,
            2,
            self.NO_SOFT_RESET,
            writable=self.POWER_STATE_MASK | (self.PME_ENABLE if pme else 0),
            write_clears=self.PME_STATUS if pme else 0,
        )
        return image

    def supports(self, state: int) -> bool:
        """Whether the guest may enter power state `state` (D1 and D2 are optional)."""
        optional = {PowerState.D1: self.d1, PowerState.D2: self.d2}
        return optional.get(PowerState(state), True)

    def after_write(
        self, registers: Registers, base: int, before: bytes, offset: int, data: bytes
    ) -> bool:
        pmcsr = base + self.PMCSR
        if _touches(offset, data, pmcsr, 1):
            value = registers.register(pmcsr, 2)
            if not self.supports(value & self.POWER_STATE_MASK):
                old_state = before[self.PMCSR] & self.POWER_STATE_MASK
                registers.set_register(pmcsr, 2, (value & ~self.POWER_STATE_MASK) | old_state)
        return False


@dataclass(frozen=True, eq=False)
class Msi(Capability):
    """MSI in any of its four layouts: 32- or 64-bit address, with or without
    per-vector masking; optionally Extended Message Data."""

    cap_id: ClassVar[int] = CapId.MSI
    CONTROL: ClassVar[int] = 2
    ADDRESS: ClassVar[int] = 4
    ENABLE: ClassVar[int] = 0x1
    MME_SHIFT: ClassVar[int] = 4
    MME_MASK: ClassVar[int] = 0x70

    vectors: int = 1
    address_64: bool = True
    per_vector_masking: bool = False
    extended_data: bool = False

    def __post_init__(self) -> None:
        if self.vectors not in MSI_VECTOR_COUNTS:
            raise ValueError(f"MSI vectors must be one of {MSI_VECTOR_COUNTS}")

    @property
    def data_offset(self) -> int:
        """Where Message Data sits: after a 32- or 64-bit Message Address."""
        return 0x0C if self.address_64 else 0x08

    @property
    def mask_offset(self) -> int | None:
        """Where the Mask Bits register is, with per-vector masking."""
        return self.data_offset + 4 if self.per_vector_masking else None

    @property
    def pending_offset(self) -> int | None:
        """Where Pending Bits sit; None without per-vector masking."""
        mask = self.mask_offset
        return None if mask is None else mask + 4

    @property
    def size(self) -> int:
        pending = self.pending_offset
        if pending is not None:
            return pending + 4
        return self.data_offset + (4 if self.extended_data else 2)

    @property
    def multiple_message_capable(self) -> int:
        """The MMC field: log2 of the vector count."""
        return self.vectors.bit_length() - 1

    def image(self) -> Image:
        image = Image(self.size)
        image.set(0, 1, self.cap_id)
        control = (
            self.multiple_message_capable << 1
            | self.address_64 << 7
            | self.per_vector_masking << 8
            | self.extended_data << 9
        )
        image.set(
            self.CONTROL,
            2,
            control,
            writable=self.ENABLE | self.MME_MASK | (0x400 if self.extended_data else 0),
        )
        image.set(self.ADDRESS, 4, 0, writable=0xFFFFFFFC)
        if self.address_64:
            image.set(self.ADDRESS + 4, 4, 0, writable=0xFFFFFFFF)
        image.set(self.data_offset, 2, 0, writable=0xFFFF)
        if self.extended_data:
            image.set(self.data_offset + 2, 2, 0, writable=0xFFFF)
        if self.mask_offset is not None:
            image.set(self.mask_offset, 4, 0, writable=(1 << self.vectors) - 1)
        return image

    def after_write(
        self, registers: Registers, base: int, before: bytes, offset: int, data: bytes
    ) -> bool:
        """Multiple Message Enable never exceeds what the device is capable of."""
        control = base + self.CONTROL
        if _touches(offset, data, control, 1):
            value = registers.register(control, 2)
            enabled = (value & self.MME_MASK) >> self.MME_SHIFT
            if enabled > self.multiple_message_capable:
                value = (value & ~self.MME_MASK) | self.multiple_message_capable << self.MME_SHIFT
                registers.set_register(control, 2, value)
        return False


@dataclass(frozen=True, eq=False)
class MsiX(Capability):
    """MSI-X: `table_size` vectors, the table and the Pending Bit Array each at an
    8-byte aligned offset in a memory BAR (checked against the device's BARs)."""

    cap_id: ClassVar[int] = CapId.MSIX
    CONTROL: ClassVar[int] = 2
    TABLE: ClassVar[int] = 4
    PBA: ClassVar[int] = 8
    FUNCTION_MASK: ClassVar[int] = 0x4000
    ENABLE: ClassVar[int] = 0x8000
    TABLE_SIZE_MASK: ClassVar[int] = 0x7FF
    """Message Control's Table Size field (the number of vectors less one)."""
    BIR_MASK: ClassVar[int] = 0x7
    """The BAR indicator in the Table and PBA registers; the offset is the rest."""
    ENTRY_SIZE: ClassVar[int] = 16
    VECTOR_CONTROL: ClassVar[int] = 12
    """An entry's Vector Control dword, after the address and data."""
    VECTOR_MASKED: ClassVar[int] = 0x1
    """Vector Control's Mask bit."""

    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    def __post_init__(self) -> None:
        if not 1 <= self.table_size <= MAX_MSIX_VECTORS:
            raise ValueError(f"MSI-X table size must be 1…{MAX_MSIX_VECTORS}")
        for name in ("table", "pba"):
            bar, offset = getattr(self, f"{name}_bar"), getattr(self, f"{name}_offset")
            if not 0 <= bar <= 5:
                raise ValueError(f"MSI-X {name} BAR must be 0…5")
            if offset % 8 or not 0 <= offset < 1 << 32:
                raise ValueError(f"MSI-X {name} offset must be 8-byte aligned")

    @property
    def table_bytes(self) -> int:
        """The MSI-X table's size in its BAR (16 bytes per entry)."""
        return self.ENTRY_SIZE * self.table_size

    @property
    def pba_bytes(self) -> int:
        """The PBA's size in its BAR: a bit per vector, in whole qwords."""
        return 8 * -(-self.table_size // 64)

    @property
    def size(self) -> int:
        return 12

    def image(self) -> Image:
        image = Image(self.size)
        image.set(0, 1, self.cap_id)
        image.set(self.CONTROL, 2, self.table_size - 1, writable=self.FUNCTION_MASK | self.ENABLE)
        image.set(self.TABLE, 4, self.table_offset | self.table_bar)
        image.set(self.PBA, 4, self.pba_offset | self.pba_bar)
        return image


@dataclass(frozen=True, eq=False)
class PciExpress(Capability):
    """A PCI Express capability, version 2, for an endpoint (60 bytes).

    Its presence makes config space 4096 bytes. Device Control's fields are
    writable, and with `flr` writing Initiate FLR resets the function (the
    device's reset hook hears ResetReason.FLR). The link reports its maximum
    speed and width as trained; a root-complex integrated endpoint has no link.
    """

    cap_id: ClassVar[int] = CapId.PCI_EXPRESS
    CAPABILITIES: ClassVar[int] = 0x02
    DEVICE_CAPABILITIES: ClassVar[int] = 0x04
    DEVICE_CONTROL: ClassVar[int] = 0x08
    DEVICE_STATUS: ClassVar[int] = 0x0A
    LINK_CAPABILITIES: ClassVar[int] = 0x0C
    LINK_CONTROL: ClassVar[int] = 0x10
    LINK_STATUS: ClassVar[int] = 0x12
    LINK_CAPABILITIES_2: ClassVar[int] = 0x2C
    LINK_CONTROL_2: ClassVar[int] = 0x30
    INITIATE_FLR: ClassVar[int] = 0x8000
    FLR_CAPABLE: ClassVar[int] = 1 << 28
    ROLE_BASED_ERROR_REPORTING: ClassVar[int] = 1 << 15
    EXTENDED_TAG: ClassVar[int] = 1 << 5
    SLOT_CLOCK_CONFIGURATION: ClassVar[int] = 1 << 12
    DEVICE_CONTROL_WRITABLE: ClassVar[int] = 0x79FF
    """Error reporting enables, relaxed ordering, MPS, extended tag, no snoop, MRRS."""
    DEVICE_CONTROL_DEFAULT: ClassVar[int] = 0x2810
    """Relaxed ordering and no snoop enabled, MRRS 512 bytes (the spec's defaults)."""
    LINK_CONTROL_WRITABLE: ClassVar[int] = 0x00CB
    """ASPM control, read completion boundary, common clock, extended synch."""

    device_type: PcieType = PcieType.ENDPOINT
    flr: bool = True
    max_payload_size: int = 128
    extended_tag: bool = False
    link_speed: int = 1
    """1: 2.5 GT/s, 2: 5, 3: 8, 4: 16, 5: 32 GT/s."""
    link_width: int = 1

    def __post_init__(self) -> None:
        if self.max_payload_size not in MAX_PAYLOAD_SIZES:
            raise ValueError(f"max_payload_size must be one of {MAX_PAYLOAD_SIZES}")
        if not 1 <= self.link_speed <= MAX_LINK_SPEED:
            raise ValueError(f"link_speed must be 1…{MAX_LINK_SPEED}")
        if self.link_width not in LINK_WIDTHS:
            raise ValueError(f"link_width must be one of {LINK_WIDTHS}")

    @property
    def size(self) -> int:
        return 60

    @property
    def has_link(self) -> bool:
        """Root-complex integrated endpoints have no link registers to fill in."""
        return self.device_type != PcieType.RC_INTEGRATED_ENDPOINT

    def image(self) -> Image:
        image = Image(self.size)
        image.set(0, 1, self.cap_id)
        image.set(self.CAPABILITIES, 2, 2 | self.device_type << 4)
        device_capabilities = (
            MAX_PAYLOAD_SIZES.index(self.max_payload_size)
            | (self.EXTENDED_TAG if self.extended_tag else 0)
            | self.ROLE_BASED_ERROR_REPORTING
            | (self.FLR_CAPABLE if self.flr else 0)
        )
        image.set(self.DEVICE_CAPABILITIES, 4, device_capabilities)
        image.set(
            self.DEVICE_CONTROL,
            2,
            self.DEVICE_CONTROL_DEFAULT,
            writable=self.DEVICE_CONTROL_WRITABLE,
        )
        image.set(self.DEVICE_STATUS, 2, 0, write_clears=0x000F)
        if self.has_link:
            image.set(self.LINK_CAPABILITIES, 4, self.link_speed | self.link_width << 4)
            image.set(self.LINK_CONTROL, 2, 0, writable=self.LINK_CONTROL_WRITABLE)
            image.set(
                self.LINK_STATUS,
                2,
                self.link_speed | self.link_width << 4 | self.SLOT_CLOCK_CONFIGURATION,
            )
            speeds = ((1 << self.link_speed) - 1) << 1
            image.set(self.LINK_CAPABILITIES_2, 4, speeds)
            image.set(self.LINK_CONTROL_2, 2, self.link_speed, writable=0x000F)
        return image

    def after_write(
        self, registers: Registers, base: int, before: bytes, offset: int, data: bytes
    ) -> bool:
        """Initiate FLR always reads 0; writing it 1 asks for a function-level reset."""
        flr_byte = base + self.DEVICE_CONTROL + 1
        if self.flr and _touches(offset, data, flr_byte, 1):
            return bool(data[flr_byte - offset] & (self.INITIATE_FLR >> 8))
        return False


@dataclass(frozen=True, eq=False)
class VendorSpecific(Capability):
    """Vendor-specific capability: ID, next, length, then `data`. With `writable`,
    the guest may change `data` (the first three bytes never)."""

    cap_id: ClassVar[int] = CapId.VENDOR_SPECIFIC
    DATA: ClassVar[int] = 3

    data: bytes = b""
    writable: bool = False

    def __post_init__(self) -> None:
        if self.size > 0xC0:
            raise ValueError("a vendor-specific capability holds at most 189 data bytes")

    @property
    def size(self) -> int:
        return self.DATA + len(self.data)

    def image(self) -> Image:
        image = Image(self.size)
        image.set(0, 1, self.cap_id)
        image.set(2, 1, self.size)
        image.data[self.DATA :] = self.data
        if self.writable:
            image.writable[self.DATA :] = b"\xff" * len(self.data)
        return image


@dataclass(frozen=True, eq=False)
class ExtendedCapability:
    """An extended capability (0x100-0xFFF, PCI Express devices only); the first
    one sits at 0x100. `offset` pins it; otherwise it goes after the previous one."""

    cap_id: ClassVar[int]
    version: ClassVar[int] = 1
    offset: int | None = field(default=None, kw_only=True)

    @property
    def size(self) -> int:
        """Bytes the capability occupies in config space."""
        raise NotImplementedError

    def image(self) -> Image:
        """Bytes from the header dword on; its `next` field is filled in when chained."""
        raise NotImplementedError

    def header(self) -> int:
        return self.cap_id | self.version << 16


@dataclass(frozen=True, eq=False)
class DeviceSerialNumber(ExtendedCapability):
    """The 64-bit serial number (EUI-64), read-only."""

    cap_id: ClassVar[int] = ExtCapId.DEVICE_SERIAL_NUMBER

    serial: int

    def __post_init__(self) -> None:
        if not 0 <= self.serial < 1 << 64:
            raise ValueError("the serial number is 64 bits")

    @property
    def size(self) -> int:
        return 12

    def image(self) -> Image:
        image = Image(self.size)
        image.set(0, 4, self.header())
        image.set(4, 8, self.serial)
        return image


@dataclass(frozen=True, eq=False)
class VendorSpecificExtended(ExtendedCapability):
    """Vendor-Specific Extended Capability: VSEC ID, revision, then `data`. With
    `writable`, the guest may change `data` (the two header dwords never)."""

    cap_id: ClassVar[int] = ExtCapId.VENDOR_SPECIFIC
    DATA: ClassVar[int] = 8

    vsec_id: int
    revision: int = 0
    data: bytes = b""
    writable: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.vsec_id < 1 << 16 or not 0 <= self.revision < 16:
            raise ValueError("vsec_id is 16 bits, revision 4 bits")
        if self.size >= 1 << 12:
            raise ValueError("a VSEC is shorter than 4 KiB")

    @property
    def size(self) -> int:
        return self.DATA + len(self.data)

    def image(self) -> Image:
        image = Image(self.size)
        image.set(0, 4, self.header())
        image.set(4, 4, self.vsec_id | self.revision << 16 | self.size << 20)
        image.data[self.DATA :] = self.data
        if self.writable:
            image.writable[self.DATA :] = b"\xff" * len(self.data)
        return image
