"""The qcow2 backend: header, refcounts, L2 cache, the image itself, checks and creation (worker; create/info also daemon/CLI)."""
