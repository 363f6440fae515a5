"""Host ports below the unprivileged start need CAP_NET_BIND_SERVICE; bind errors read as causes."""

import errno

from tenbox_vmm.net import ports


def test_privileged_port_without_capability_says_why_and_what_to_do():
    msg = ports.privileged_port_error(80, start=1024, capable=False)
    assert "host port 80 is privileged" in msg
    assert "CAP_NET_BIND_SERVICE" in msg and "1024" in msg and "\n" not in msg


def test_privileged_port_with_capability_or_high_port_is_fine():
    assert ports.privileged_port_error(80, start=1024, capable=True) is None
    assert ports.privileged_port_error(1024, start=1024, capable=False) is None
    assert ports.privileged_port_error(80, start=0, capable=False) is None


def test_capability_bit_is_read_from_proc_status(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000000400\n")
    assert ports.has_net_bind_service(str(status))
    status.write_text("Name:\tx\nCapEff:\t00000000000003ff\n")
    assert not ports.has_net_bind_service(str(status))


def test_unprivileged_port_start_is_read_with_a_default(tmp_path):
    p = tmp_path / "start"
    p.write_text("80\n")
    assert ports.unprivileged_port_start(str(p)) == 80
    assert ports.unprivileged_port_start(str(tmp_path / "missing")) == 1024


def test_bind_errors_name_the_socket_and_the_cause():
    what = "tcp 127.0.0.1:2222"
    assert ports.bind_error(errno.EADDRINUSE, what) == "tcp 127.0.0.1:2222 is already in use"
    assert "permission denied" in ports.bind_error(errno.EACCES, what)
    assert "not one of this host's" in ports.bind_error(errno.EADDRNOTAVAIL, what)
    assert what in ports.bind_error(errno.ENOBUFS, what)
