"""A 16550A UART, the guest's console on COM1 (worker).

Transmit is instantaneous: every THR write goes to the output sink and the
transmitter is empty again at once. Received bytes wait in a bounded queue
that the console feeds; when it is full the console stops reading its input,
so nothing typed is lost. Loopback mode behaves as the chip does, because
Linux's 8250 driver probes the port through it.

The machine may let KVM queue THR writes without an exit while the guest
polls the transmitter, as Linux's printk console does (two exits a byte
otherwise). `on_tx_interrupts` tells it when the guest turns the transmit
interrupt on or off (after a reset it is off): an interrupt-driven driver
needs each write seen when it happens, to get its interrupt.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Deque, Optional

RX_QUEUE_MAX = 4096

# Register offsets
RBR_THR = 0  # DLL when DLAB
IER = 1  # DLM when DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MS = 0x08

IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80


class Serial16550:
    """COM-port registers at offsets 0..7."""

    def __init__(self, set_irq: Callable[[int], None], output: Callable[[bytes], None],
                 on_tx_interrupts: Optional[Callable[[bool], None]] = None) -> None:
        self._set_irq = set_irq
        self._output = output
        self._on_tx_interrupts = on_tx_interrupts
        self._lock = threading.Lock()
        self._rx: Deque[int] = collections.deque()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._rx.clear()
            self.ier = 0
            self.lcr = 0x03
            self.mcr = MCR_OUT2
            self.fcr = 0
            self.scr = 0
            self.dll = 0x0C  # 9600 baud until the guest says otherwise
            self.dlm = 0
            self._thre_pending = False
            self._irq = 0
        self._set_irq(0)

    def save_state(self) -> dict:
        """Registers and received bytes not read yet (snapshot/records.py SERIAL)."""
        with self._lock:
            return dict(ier=self.ier, lcr=self.lcr, mcr=self.mcr, fcr=self.fcr, scr=self.scr, dll=self.dll,
                        dlm=self.dlm, thre_pending=self._thre_pending, irq=self._irq, rx=bytes(self._rx))

    def load_state(self, s: dict) -> None:
        """Take a checked record back; the interrupt line is raised again if it is due.

        Input the console queued before the restore (typed as the VM started) comes after
        the saved input, not instead of it. The line is raised anew (the in-kernel chips'
        line levels are not part of their saved state), so a pending interrupt is not lost.
        """
        with self._lock:
            self.ier, self.lcr, self.mcr, self.fcr = s["ier"], s["lcr"], s["mcr"], s["fcr"]
            self.scr, self.dll, self.dlm = s["scr"], s["dll"], s["dlm"]
            self._thre_pending = s["thre_pending"]
            typed = list(self._rx)
            self._rx.clear()
            self._rx.extend(s["rx"])
            self._rx.extend(typed[: RX_QUEUE_MAX - len(self._rx)])
            self._irq = 0
            self._update_irq()

    @property
    def tx_interrupts(self) -> bool:
        """Whether the guest has the transmit-holding-register-empty interrupt on."""
        return bool(self.ier & IER_THRE)

    # Console side -------------------------------------------------------

    def rx_space(self) -> int:
        return RX_QUEUE_MAX - len(self._rx)

    def receive(self, data: bytes) -> int:
        """Queue input for the guest; returns how many bytes were taken."""
        with self._lock:
            n = min(len(data), RX_QUEUE_MAX - len(self._rx))
            self._rx.extend(data[:n])
            self._update_irq()
        return n

    # Interrupt logic ------------------------------------------------------

    def _iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
        if self.ier & IER_RDA and self._rx:
            return IIR_RDA | fifo
        if self.ier & IER_THRE and self._thre_pending:
            return IIR_THRE | fifo
        return IIR_NONE | fifo

    def _update_irq(self) -> None:
        level = 0 if self._iir() & IIR_NONE else 1
        if level != self._irq:
            self._irq = level
            self._set_irq(level)

    def _modem_status(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        return MSR_DCD | MSR_DSR | MSR_CTS

    # Register access ------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR:
                if dlab:
                    return self.dll
                value = self._rx.popleft() if self._rx else 0
                self._update_irq()
                return value
            if offset == IER:
                return self.dlm if dlab else self.ier
            if offset == IIR_FCR:
                iir = self._iir()
                if iir & 0x0F == IIR_THRE:
                    self._thre_pending = False  # reading IIR acknowledges THRE
                    self._update_irq()
                return iir
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == LSR:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
            if offset == MSR:
                return self._modem_status()
            if offset == SCR:
                return self.scr
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        out = None
        tx_changed = False
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR:
                if dlab:
                    self.dll = value
                elif self.mcr & MCR_LOOP:
                    if len(self._rx) < RX_QUEUE_MAX:
                        self._rx.append(value)
                    self._thre_pending = True
                else:
                    out = bytes((value,))
                    self._thre_pending = True
            elif offset == IER:
                if dlab:
                    self.dlm = value
                else:
                    if value & IER_THRE and not self.ier & IER_THRE:
                        self._thre_pending = True  # THR is empty: interrupt at once
                    tx_changed = bool((value ^ self.ier) & IER_THRE)
                    self.ier = value & 0x0F
            elif offset == IIR_FCR:
                if value & FCR_CLEAR_RX:
                    self._rx.clear()
                self.fcr = value & 0xC9  # trigger level and enable; clear bits self-reset
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & 0x1F
            elif offset == SCR:
                self.scr = value
            self._update_irq()
        if out is not None:
            self._output(out)
        if tx_changed and self._on_tx_interrupts is not None:
            self._on_tx_interrupts(bool(value & IER_THRE))
