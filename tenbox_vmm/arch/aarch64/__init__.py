"""The arm64 machine: guest-physical layout, the `Image` boot protocol and the device tree (worker)."""
