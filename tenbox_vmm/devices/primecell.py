"""The ID registers every ARM PrimeCell peripheral ends its 4 KiB page with (worker).

Linux's AMBA bus reads them to bind a driver: PeriphID0..3 at 0xfe0..0xfec
(part number, designer, revision) and PCellID0..3 at 0xff0..0xffc, the
fixed marker 0xb105f00d, one byte per 32-bit register.
"""

from __future__ import annotations

from typing import Optional, Tuple

ID_BASE = 0xFE0
CELL_ID = (0x0D, 0xF0, 0x05, 0xB1)


def id_bytes(periph_id: int) -> Tuple[int, ...]:
    """The eight ID register values of a peripheral whose AMBA id is `periph_id` (e.g. 0x00041031)."""
    return tuple((periph_id >> (8 * i)) & 0xFF for i in range(4)) + CELL_ID


def id_register(offset: int, ids: Tuple[int, ...]) -> Optional[int]:
    """The value at `offset` if it is one of the ID registers, else None."""
    if ID_BASE <= offset < ID_BASE + 4 * len(ids) and offset % 4 == 0:
        return ids[(offset - ID_BASE) // 4]
    return None
