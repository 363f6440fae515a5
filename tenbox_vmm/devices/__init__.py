"""Emulated devices and the buses they sit on (worker).

Device models are pure: `read(offset, size) -> int` and
`write(offset, size, value)`, with interrupts and side effects (console
output, poweroff, reset) reached through callbacks given at construction.
No device owns a thread or a socket.
"""
