"""The one error of the snapshot package (worker; pure)."""


class SnapshotError(Exception):
    """A snapshot cannot be written or loaded; the message is one line for the operator."""
