"""The arm64 machine's PL061 GPIO (tenbox_vmm/devices/pl061.py): the power button's line as gpio-pl061 drives it."""

import threading

from tenbox_vmm.devices import pl061
from tenbox_vmm.devices.pl061 import DIR, IBE, IC, IE, IEV, IS, MIS, RIS, Pl061


class Line:
    def __init__(self):
        self.levels = []

    def __call__(self, level):
        self.levels.append(level)


def _gpio_keys(line=3):
    """Line 3 as gpio-keys asks for it: an input, an interrupt on both edges, unmasked."""
    irq = Line()
    gpio = Pl061(irq)
    gpio.write(DIR, 1, 0)
    gpio.write(IS, 1, 0)
    gpio.write(IBE, 1, 1 << line)
    gpio.write(IE, 1, 1 << line)
    return gpio, irq


def test_the_primecell_ids_are_what_linuxs_amba_bus_matches():
    gpio = Pl061(Line())
    ids = [gpio.read(pl061.ID_BASE + 4 * i, 4) for i in range(8)]
    assert ids[0] | ids[1] << 8 | (ids[2] & 0xF) << 16 == 0x41061  # gpio-pl061's amba_id
    assert ids[4:] == [0x0D, 0xF0, 0x05, 0xB1]


def test_a_press_and_a_release_each_raise_the_line_until_cleared():
    gpio, irq = _gpio_keys()
    assert irq.levels[-1] == 0
    gpio.set_input(3, 1)
    assert (gpio.read(RIS, 1), gpio.read(MIS, 1), irq.levels[-1]) == (8, 8, 1)
    assert gpio.read(0x3FC, 1) == 8 and gpio.read(0x3FC & ~(8 << 2), 1) == 0  # DATA's address masks the lines
    gpio.write(IC, 1, 8)
    assert (gpio.read(RIS, 1), irq.levels[-1]) == (0, 0)
    gpio.set_input(3, 0)  # the release is the other edge
    assert (gpio.read(RIS, 1), irq.levels[-1]) == (8, 1)


def test_single_edges_and_levels_follow_iev_and_is():
    gpio = Pl061(Line())
    gpio.write(IE, 1, 0xFF)
    gpio.write(IEV, 1, 1 << 1)  # line 1 rising, line 2 falling
    gpio.set_input(1, 1)
    gpio.set_input(2, 1)
    assert gpio.read(RIS, 1) == 1 << 1
    gpio.set_input(2, 0)
    assert gpio.read(RIS, 1) == (1 << 1) | (1 << 2)
    gpio.write(IC, 1, 0xFF)
    gpio.write(IS, 1, 1 << 5)  # line 5: level, high
    gpio.write(IEV, 1, 1 << 5)
    assert gpio.read(RIS, 1) == 0
    gpio.set_input(5, 1)
    gpio.write(IC, 1, 0xFF)
    assert gpio.read(RIS, 1) == 1 << 5  # a level holds while the line does
    gpio.set_input(5, 0)
    assert gpio.read(RIS, 1) == 0


def test_outputs_are_the_guests_and_inputs_the_hosts():
    gpio = Pl061(Line())
    gpio.write(DIR, 1, 0x0F)
    gpio.write(0x3FC, 1, 0xFF)  # all lines addressed: only the outputs take it
    gpio.set_input(7, 1)
    assert gpio.read(0x3FC, 1) == 0x8F
    gpio.set_input(0, 0)  # an output: the host's level does not show
    assert gpio.read(0x3FC, 1) == 0x8F


def test_a_pulse_lets_go_by_itself():
    gpio, irq = _gpio_keys()
    gpio.pulse(3, 0.05)
    assert gpio.read(0x3FC, 1) == 8
    deadline = threading.Event()
    for _ in range(100):
        if gpio.read(0x3FC, 1) == 0:
            break
        deadline.wait(0.02)
    assert gpio.read(0x3FC, 1) == 0
    gpio.close()
