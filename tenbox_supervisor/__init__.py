"""tenbox_supervisor: tenboxd, the host daemon (runs as root under systemd)."""

from tenbox_vmm.protocol import VERSION as __version__

__all__ = ["__version__"]
