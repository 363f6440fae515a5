"""`tenbox vm ssh`'s choices: which forward, which key (tests; any user)."""

from __future__ import annotations

import subprocess

from tenbox_ctl.vm_ssh import fingerprint, matching_key, ssh_forward
from tenbox_supervisor.cloudinit import key_fingerprint


def test_the_first_tcp_forward_to_guest_port_22_is_used_and_any_address_means_loopback():
    assert ssh_forward(["tcp::8080-:80", "udp::2222-:22", "tcp:127.0.0.1:2200-:22", "tcp::2201-:22"]) == \
        ("127.0.0.1", 2200)
    assert ssh_forward(["tcp:0.0.0.0:2222-:22"]) == ("127.0.0.1", 2222)
    assert ssh_forward(["tcp:[::]:2222-:22"]) == ("::1", 2222)
    assert ssh_forward(["tcp::2222-10.0.2.15:22"]) == ("127.0.0.1", 2222)
    assert ssh_forward(["tcp::8080-:80", "not a spec"]) is None
    assert ssh_forward([]) is None


def test_the_private_key_whose_public_key_the_vm_was_given_is_found(tmp_path):
    ssh_dir = tmp_path / ".ssh"
    ssh_dir.mkdir()
    for name, kind in (("id_rsa", "rsa"), ("work", "ed25519"), ("other", "ecdsa")):
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(ssh_dir / name)], check=True)
    pub = (ssh_dir / "work.pub").read_text()
    shown = subprocess.run(["ssh-keygen", "-lf", str(ssh_dir / "work.pub")], capture_output=True, text=True,
                           check=True).stdout.split()[1]
    assert fingerprint(pub) == key_fingerprint(pub) == shown  # the CLI and tenboxd agree with ssh-keygen
    assert matching_key([shown], ssh_dir) == ssh_dir / "work"
    assert matching_key(["SHA256:nothere"], ssh_dir) is None
    assert matching_key([], ssh_dir) is None
    (ssh_dir / "work").unlink()  # a public key without its private key is no use
    assert matching_key([shown], ssh_dir) is None
    assert fingerprint("ssh-ed25519 !!notbase64") is None and fingerprint("") is None
