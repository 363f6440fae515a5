"""Machine snapshots (worker): the file format, the CPU model a state depends on, and its records.

`fileformat` writes and reads snapshot files (crash-safe, versioned, hostile
files refused with one line); `cpu_model` describes what the saved vCPU state
depends on; `records` checks every saved record's ranges before anything is
loaded. Capturing and restoring a running machine is `machine.py`'s work.
"""

from tenbox_vmm.snapshot.errors import SnapshotError

__all__ = ["SnapshotError"]
