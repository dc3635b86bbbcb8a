"""null: the smallest muser device.

It has an identity and nothing else: no BARs, no interrupts. A guest sees a PCI
device with these IDs in `lspci`, and no driver binds to it. Run it with

    python -m muser.run null --socket /tmp/null.sock

The IDs are those of libvfio-user's null sample (vendor 0x4e58, device 0), which
no driver claims; the class code says "unassigned class".
"""

from __future__ import annotations

import muser

VENDOR_ID = 0x4E58
DEVICE_ID = 0x0000
CLASS_UNCLASSIFIED = 0xFF0000


def create() -> muser.PciDevice:
    return muser.PciDevice(
        vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=CLASS_UNCLASSIFIED, name="null"
    )
