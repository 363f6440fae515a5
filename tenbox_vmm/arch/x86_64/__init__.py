"""x86-64 machine specifics (worker): boot protocol, CPU state, ACPI tables."""
