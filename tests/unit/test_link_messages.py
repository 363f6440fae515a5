"""The worker link's typed messages: the bytes on the wire are the maps the link always sent, and bad frames are refused."""

import msgpack
import pytest

from tenbox_vmm.protocol import VmState
from tenbox_vmm.protocol.disk_arg import DiskArg
from tenbox_vmm.protocol.link import (
    LINK_VERSION,
    Command,
    CommandName,
    ConsoleData,
    Heartbeat,
    Hello,
    NetReport,
    NetStatus,
    Reply,
    StateReport,
    UnknownCommand,
    WorkerExit,
    Who,
    decode,
    encode,
)

NET = NetStatus(link_up=True, mac="52:54:00:12:34:56", hostfwds=("tcp:127.0.0.1:2222-:22",), guestfwds=(),
                failures=(("udp:127.0.0.1:53-:53", "address in use"),))
NET_MAP = {"link_up": True, "mac": "52:54:00:12:34:56", "hostfwds": ["tcp:127.0.0.1:2222-:22"], "guestfwds": [],
           "failures": [["udp:127.0.0.1:53-:53", "address in use"]]}

# Each message and the map the first wave's code built for it, key order included.
WIRE = [
    (Hello(vm_id="web", pid=4242, create_time=1700000000.25, state=VmState.RUNNING, started_at=1700000001.5,
           boots=2, version="0.1.0", net=NET),
     {"t": "hello", "vm_id": "web", "pid": 4242, "create_time": 1700000000.25, "state": "running",
      "started_at": 1700000001.5, "boots": 2, "protocol": LINK_VERSION, "version": "0.1.0", "net": NET_MAP}),
    (Hello(vm_id="web", pid=1, create_time=2.0, state=VmState.STOPPED, started_at=0.0, boots=0, version="0.1.0"),
     {"t": "hello", "vm_id": "web", "pid": 1, "create_time": 2.0, "state": "stopped", "started_at": 0.0,
      "boots": 0, "protocol": LINK_VERSION, "version": "0.1.0", "net": None}),
    (StateReport(VmState.REBOOTING, "guest reset"), {"t": "state", "state": "rebooting", "reason": "guest reset"}),
    (ConsoleData(b"login: "), {"t": "console", "data": b"login: "}),
    (Reply(7, True, result={"failures": []}), {"t": "reply", "id": 7, "ok": True, "result": {"failures": []}}),
    (Reply(0, False, error="no network card"), {"t": "reply", "id": 0, "ok": False, "error": "no network card"}),
    (Reply(3, True), {"t": "reply", "id": 3, "ok": True}),
    (WorkerExit(3, "stopped by tenboxd"), {"t": "exit", "code": 3, "reason": "stopped by tenboxd"}),
    (NetReport(NET), dict({"t": "net"}, **NET_MAP)),
    (Heartbeat(VmState.RUNNING), {"t": "heartbeat", "state": "running"}),
    (Heartbeat(), {"t": "heartbeat"}),
    (Command(0, CommandName.STOP, {"reason": "vm.stop"}),
     {"t": "command", "id": 0, "name": "stop", "args": {"reason": "vm.stop"}}),
    (Command(0, CommandName.SHUTDOWN), {"t": "command", "id": 0, "name": "shutdown"}),
    (Command(0, CommandName.REBOOT), {"t": "command", "id": 0, "name": "reboot"}),
    (Command(5, CommandName.NET_FORWARDS, {"hostfwds": [], "guestfwds": []}),
     {"t": "command", "id": 5, "name": "net_forwards", "args": {"hostfwds": [], "guestfwds": []}}),
    (Command(6, CommandName.SNAPSHOT, {"name": "warm"}),
     {"t": "command", "id": 6, "name": "snapshot", "args": {"name": "warm"}}),
    (Who(), {"t": "who"}),
]


@pytest.mark.parametrize("msg, old", WIRE, ids=[type(m).__name__ for m, _ in WIRE])
def test_every_message_encodes_to_the_bytes_the_link_always_carried(msg, old):
    assert encode(msg) == msgpack.packb(old, use_bin_type=True)


@pytest.mark.parametrize("msg, old", WIRE, ids=[type(m).__name__ for m, _ in WIRE])
def test_every_message_decodes_to_itself(msg, old):
    back = decode(encode(msg))
    if isinstance(msg, Command) and msg.args is None:
        assert back == Command(msg.id, msg.name, {})  # a command without args reads as empty args
    else:
        assert back == msg


@pytest.mark.parametrize("frame, why", [
    (b"\xc1", "undecodable"),
    (msgpack.packb([1, 2]), "not a message"),
    (msgpack.packb({"t": "explode"}), "unknown message type"),
    (msgpack.packb({"t": "hello", "pid": "1", "create_time": 1.0, "state": "running"}), "pid"),
    (msgpack.packb({"t": "hello", "pid": True, "create_time": 1.0, "state": "running"}), "pid"),
    (msgpack.packb({"t": "state", "state": "flying"}), "unknown state"),
    (msgpack.packb({"t": "console", "data": "text, not bytes"}), "data"),
    (msgpack.packb({"t": "exit", "reason": "no code"}), "code"),
    (b"\x00" * ((1 << 20) + 1), "too large"),
])
def test_malformed_frames_are_refused_with_a_reason(frame, why):
    with pytest.raises(ValueError, match=why):
        decode(frame)


def test_an_unknown_command_names_its_id_so_the_worker_can_answer():
    with pytest.raises(UnknownCommand) as e:
        decode(msgpack.packb({"t": "command", "id": 9, "name": "teleport"}))
    assert e.value.req_id == 9 and "teleport" in str(e.value)


def test_a_hello_without_a_link_version_is_version_zero():
    frame = msgpack.packb({"t": "hello", "vm_id": "a", "pid": 1, "create_time": 1.0, "state": "running"})
    assert decode(frame).link_version == 0 != LINK_VERSION


@pytest.mark.parametrize("arg, disk", [
    ("/d/a.raw", DiskArg("/d/a.raw")),
    ("/d/a.qcow2,ro,serial=data1,format=qcow2", DiskArg("/d/a.qcow2", True, "data1", "qcow2")),
    ("/d/b.img,format=raw", DiskArg("/d/b.img", format="raw")),
])
def test_the_disk_argument_round_trips(arg, disk):
    assert DiskArg.parse(arg) == disk and disk.to_arg() == arg


@pytest.mark.parametrize("arg, why", [
    (",ro", "the path is empty"),
    ("/d/a,serial=" + "x" * 21, "serial must be up to 20"),
    ("/d/a,format=vmdk", "format must be raw or qcow2"),
    ("/d/a,cache=none", "unknown option 'cache=none'"),
])
def test_a_bad_disk_argument_is_one_line_naming_the_problem(arg, why):
    with pytest.raises(ValueError, match=why):
        DiskArg.parse(arg)
