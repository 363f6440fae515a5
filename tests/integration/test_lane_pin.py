"""The x86 nested lane runs its command on one CPU and sends device interrupts to the other.

Why (docs/testing.md, "Fewer IPIs into KVM_RUN"): QEMU's emulated AMD-V can
deliver an interrupt between #VMEXIT and KVM's cli, which kills the lane's
kernel, and most interrupts into a CPU in KVM_RUN are IPIs from the other
CPU. lane-init pins the command (and everything it starts) with taskset when
the kernel command line has lane.cpu=N, which lane.qemu_argv adds unless
pin=False. A real lane each time: its boot and one Python start, about 15 s.
"""

import re
import uuid

import pytest

from tests.framework import lane

DEADLINE_SEC = 300
# What the command reports: its CPUs (inherited by what it starts), a child's, the kernel's
# default interrupt affinity (a hex mask) and the CPUs of the first virtio interrupt (the 9p
# shares'), which existed before lane-init moved them.
PROBE = ("python3 -c 'import os; print(\"PIN: self=%%s\" %% sorted(os.sched_getaffinity(0)))'; "
         "sh -c 'echo PIN: child=$(taskset -pc $$ | sed \"s/.*: //\")'; "
         "echo PIN: irq=$(cat /proc/irq/default_smp_affinity); "
         "n=$(awk -F: '/virtio/ {print $1 + 0; exit}' /proc/interrupts); "
         "echo PIN: virtio=$(cat /proc/irq/$n/smp_affinity_list); echo PIN: token=%s")


def run_probe(tmp_path, pin: bool) -> dict:
    token = uuid.uuid4().hex
    out = tmp_path / ("pinned" if pin else "free")
    out.mkdir()
    res = lane.run(PROBE % token, out, DEADLINE_SEC, console_log=out / "console.log", pin=pin)
    assert res.rc == 0, "%s\n%s" % (res.reason, lane.tail(res.console))
    found = dict(re.findall(r"^PIN: (\w+)=(.*?)\s*$", res.console, re.M))
    assert found.get("token") == token, lane.tail(res.console)  # the probe ran, to its end
    found["console"] = res.console
    return found


@pytest.mark.usefixtures("kvm")
def test_the_lane_command_and_its_children_run_on_the_last_cpu_and_interrupts_go_elsewhere(tmp_path):
    assert lane.CPUS == 2  # the masks below are a two-CPU lane's
    found = run_probe(tmp_path, pin=True)
    assert "LANE: the run is on cpu 1" in found["console"]
    assert found["self"] == "[1]", found
    assert found["child"] == "1", found
    assert int(found["irq"], 16) == 0b01, found  # CPU 0 only
    assert found["virtio"] == "0", found


@pytest.mark.usefixtures("kvm")
def test_an_unpinned_lane_runs_its_command_on_every_cpu(tmp_path):
    found = run_probe(tmp_path, pin=False)
    assert "the run is on cpu" not in found["console"]
    assert found["self"] == "[0, 1]", found
    assert found["child"] == "0,1", found
    assert int(found["irq"], 16) & 0b11 == 0b11, found
    assert found["virtio"] == "0-1", found
