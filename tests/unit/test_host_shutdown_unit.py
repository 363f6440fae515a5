"""tenbox-guests.service tells a host shutdown from an upgrade: its stop powers the VMs off, nothing of an upgrade stops it."""

import re
from collections import defaultdict

from tests.framework.repo import REPO

UNIT = REPO / "systemd" / "tenbox-guests.service"


def directives(path):
    """{section: {key: [values]}} of a systemd unit (keys may repeat)."""
    out = defaultdict(lambda: defaultdict(list))
    section = None
    for line in path.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[section][key].append(value)
    return out


def test_its_stop_asks_tenboxd_to_power_the_vms_off_with_the_configured_timeout():
    unit = directives(UNIT)
    assert unit["Service"]["Type"] == ["oneshot"] and unit["Service"]["RemainAfterExit"] == ["yes"]
    assert unit["Service"]["ExecStop"] == ["-/usr/bin/tenboxctl host shutdown-vms"]
    assert unit["Service"]["EnvironmentFile"] == ["-/etc/default/tenbox"]
    assert unit["Service"]["TimeoutStopSec"] == ["infinity"]  # the CLI bounds the wait itself
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_it_stops_before_tenboxd_the_network_and_the_file_systems():
    after = " ".join(directives(UNIT)["Unit"]["After"]).split()
    for target in ("tenboxd.service", "network.target", "remote-fs.target", "local-fs.target"):
        assert target in after


def test_nothing_an_upgrade_does_to_tenboxd_reaches_it():
    """A stop or restart of tenboxd propagates through Requires=, BindsTo=, PartOf= (and tenboxd's
    PropagatesStopTo=); none may name the other unit, and the maintainer scripts restart tenboxd only."""
    unit = directives(UNIT)["Unit"]
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert key not in unit
    assert "tenbox-guests" not in (REPO / "systemd" / "tenboxd.service").read_text()
    postinst = (REPO / "debian" / "postinst").read_text()
    assert "UNIT=tenboxd.service" in postinst and "tenbox-guests" not in postinst
    prerm = (REPO / "debian" / "prerm").read_text()
    assert not re.search(r"deb-systemd-invoke (stop|restart) tenbox-guests", prerm)
    rules = (REPO / "debian" / "rules").read_text()
    assert "systemd/tenbox-guests.service debian/tenbox/lib/systemd/system/tenbox-guests.service" in rules
    assert "--no-stop-on-upgrade" in rules and "--no-start" in rules


def test_the_installer_starts_it_and_never_restarts_it():
    installer = (REPO / "scripts" / "install-linux.sh").read_text()
    assert "systemctl enable tenbox-guests" in installer and "systemctl start tenbox-guests" in installer
    assert "restart tenbox-guests" not in installer
