"""cloud-init NoCloud seeds (tenbox_supervisor/cloudinit.py): input checks, seed contents, the cidata disk.

Real tools throughout: keys made by ssh-keygen, the disk made by xorriso
and read back by xorriso (-osirrox) and blkid, and, where Debian's
cloud-init package can be fetched (apt-get download), cloud-init's own
NoCloud datasource and user-data processor reading the seed as a guest
would.
"""

from __future__ import annotations

import base64
import email
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tenbox_supervisor import cloudinit
from tenbox_supervisor.cloudinit import (
    NETWORK_CONFIG_MAX, SSH_KEYS_MAX, SSH_KEYS_MAX_BYTES, USER_DATA_MAX, ProvisionError, SeedBuildError,
    build_seed, check_hostname, check_network_config, check_ssh_keys, check_user, check_user_data,
    new_instance_id, seed_files)
from tests.framework.repo import CACHE, PYTHON

try:
    import yaml  # PyYAML, when installed: the cloud-config is then parsed, not only read as text
except ImportError:  # pragma: no cover - Debian's python3-yaml is usually there
    yaml = None


@pytest.fixture
def xorriso() -> None:
    """xorriso makes the seed and is the reader that judges it: without it the disk tests fail, not skip."""
    if shutil.which("xorriso") is None:
        pytest.fail("xorriso missing: install Debian's xorriso package (scripts/install-deps.sh)")


needs_xorriso = pytest.mark.usefixtures("xorriso")
INSTANCE = "tenbox-0123456789abcdef0123456789abcdef"


def refusal(func, *args) -> str:
    """The one-line message of the ProvisionError that func(*args) raises."""
    with pytest.raises(ProvisionError) as info:
        func(*args)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def keygen(tmp_path: Path, key_type: str, bits: int = 0, comment: str = "me@laptop") -> Path:
    """A new key pair made by ssh-keygen; the private key's path (the public one is beside it, .pub)."""
    path = tmp_path / ("id_%s_%d" % (key_type, bits))
    argv = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path)]
    if bits:
        argv[4:4] = ["-b", str(bits)]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, timeout=60)
    return path


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def key_line(key_type: str, *fields: bytes, blob_type: str = "") -> str:
    """A public key line whose blob is built here, field by field (for keys ssh-keygen cannot make)."""
    blob = ssh_string((blob_type or key_type).encode()) + b"".join(ssh_string(f) for f in fields)
    return "%s %s test" % (key_type, base64.b64encode(blob).decode())


def load_cloud_config(text: str) -> Any:
    """The cloud-config document parsed by PyYAML, or None when PyYAML is not installed."""
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text) if yaml is not None else None


# -- host names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "a", "0day", "web-1.example.com", "A-Z.b9",
                                  "a" * 63, ".".join(["a" * 63] * 3) + "." + "b" * 61])
def test_hostname_per_rfc1123_is_accepted(name):
    """Letters, digits and inner hyphens, labels up to 63, the whole up to 253 characters."""
    assert check_hostname(name) == name


@pytest.mark.parametrize("name, cause", [
    ("", "hostname is empty"),
    (".".join(["a" * 63] * 3) + "." + "b" * 62, "254 characters: RFC 1123 allows at most 253"),
    ("web.", "ends with '.': give it without the trailing dot"),
    ("a..b", "empty label"),
    (".a", "empty label"),
    ("a" * 64 + ".b", "is 64 characters: RFC 1123 allows at most 63"),
    ("web_1", "has '_': RFC 1123 allows only letters, digits and '-'"),
    ("wéb", "has 'é'"),
    ("a b", "has ' '"),
    ("a\nb", "has '\\n'"),
    ("-web", "label '-web' starts with '-'"),
    ("x.web-", "label 'web-' ends with '-'"),
    ("10.0.0.1", "is an IPv4 address"),
])
def test_hostname_not_per_rfc1123_is_refused_naming_the_rule(name, cause):
    assert cause in refusal(check_hostname, name)


# -- user names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "a", "deploy-bot_2", "x" * 32])
def test_user_name_debian_adduser_accepts_is_accepted(name):
    assert check_user(name) == name


@pytest.mark.parametrize("name, cause", [
    ("", "user name is empty"),
    ("x" * 33, "33 characters: at most 32"),
    ("Alice", "not one Debian's adduser accepts"),
    ("1alice", "not one Debian's adduser accepts"),
    ("-alice", "not one Debian's adduser accepts"),
    ("al ice", "not one Debian's adduser accepts"),
    ("alice$", "not one Debian's adduser accepts"),
    ("root", "'root' is refused"),
])
def test_user_name_adduser_refuses_or_root_is_refused(name, cause):
    assert cause in refusal(check_user, name)


# -- SSH keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type, bits", [("ed25519", 0), ("rsa", 2048), ("rsa", 1024), ("ecdsa", 256),
                                            ("ecdsa", 384), ("ecdsa", 521)])
def test_ssh_public_key_from_ssh_keygen_is_accepted(tmp_path, key_type, bits):
    """A .pub file as ssh-keygen wrote it comes back as its one key line."""
    pub = keygen(tmp_path, key_type, bits).with_suffix(".pub").read_bytes()
    assert check_ssh_keys(pub) == [pub.decode().strip()]


def test_several_keys_with_comments_blank_lines_and_crlf_are_all_kept(tmp_path):
    ed = keygen(tmp_path, "ed25519", comment="laptop key").with_suffix(".pub").read_text().strip()
    rsa = keygen(tmp_path, "rsa", 3072, comment="").with_suffix(".pub").read_text().strip()
    text = "# my keys\r\n\r\n%s\r\n   \n  %s  \n# end\n" % (ed, rsa)
    assert check_ssh_keys(text) == [ed, rsa]
    assert check_ssh_keys(text.encode()) == [ed, rsa]


def test_sk_keys_with_a_well_formed_blob_are_accepted():
    """FIDO keys (no token here to make one): the blob layout from OpenSSH's PROTOCOL.u2f."""
    ed = key_line("sk-ssh-ed25519@openssh.com", bytes(32), b"ssh:")
    ec = key_line("sk-ecdsa-sha2-nistp256@openssh.com", b"nistp256", b"\x04" + bytes(64), b"ssh:")
    assert check_ssh_keys(ed + "\n" + ec) == [ed, ec]


@pytest.mark.parametrize("key_type, extra", [("ed25519", []), ("rsa", ["-m", "PEM"]), ("ecdsa", ["-m", "PKCS8"])])
def test_private_key_given_by_mistake_is_refused_saying_so(tmp_path, key_type, extra):
    private = keygen(tmp_path, key_type)
    if extra:
        subprocess.run(["ssh-keygen", "-q", "-p", "-N", "", "-P", "", "-f", str(private)] + extra,
                       check=True, stdin=subprocess.DEVNULL, timeout=60)
    message = refusal(check_ssh_keys, private.read_bytes())
    assert "is a private key: give the public key (the .pub file)" in message


def test_rfc4716_public_key_is_refused_with_the_conversion(tmp_path):
    pub = keygen(tmp_path, "ed25519").with_suffix(".pub")
    rfc4716 = subprocess.run(["ssh-keygen", "-e", "-f", str(pub)], check=True, stdout=subprocess.PIPE,
                             timeout=60).stdout
    assert "ssh-keygen -i -f FILE" in refusal(check_ssh_keys, rfc4716)


def test_key_whose_data_is_another_type_is_refused(tmp_path):
    """The line says ed25519, the base64 holds an RSA key: refused, naming both."""
    rsa = keygen(tmp_path, "rsa", 2048).with_suffix(".pub").read_text().split()
    message = refusal(check_ssh_keys, "ssh-ed25519 %s me" % rsa[1])
    assert message == "SSH key line 1: its key data is a 'ssh-rsa' key, not ssh-ed25519"
    p256 = keygen(tmp_path, "ecdsa", 256).with_suffix(".pub").read_text().split()
    assert "is a 'ecdsa-sha2-nistp256' key, not ecdsa-sha2-nistp384" in refusal(
        check_ssh_keys, "ecdsa-sha2-nistp384 %s" % p256[1])


@pytest.mark.parametrize("line, cause", [
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "'ssh-dss' is not a public key type tenbox accepts"),
    ('command="ls" ssh-ed25519 AAAA', "is not a public key type tenbox accepts"),
    ("ssh-ed25519", "ssh-ed25519 with no key data after it"),
    ("ssh-ed25519 not*base64", "its key data is not base64"),
    (key_line("ssh-ed25519", bytes(31)), "its public key is 31 bytes, not 32"),
    (key_line("ssh-ed25519", bytes(32), b"more"), "has 8 bytes too many"),
    (key_line("ssh-ed25519"), "is cut short"),
    (key_line("ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xff" * 64), "512-bit RSA key: OpenSSH refuses"),
    (key_line("ecdsa-sha2-nistp256", b"nistp384", b"\x04" + bytes(64)), "names curve 'nistp384', not nistp256"),
    (key_line("ecdsa-sha2-nistp256", b"nistp256", b"\x02" + bytes(32)), "not an uncompressed nistp256 point"),
    ("ssh-ed25519 AAAA\x07bell", "control character"),
])
def test_malformed_key_line_is_refused_with_its_line_number(line, cause):
    message = refusal(check_ssh_keys, "# first line\n" + line + "\n")
    assert message.startswith("SSH key line 2") and cause in message, message


def test_key_limits_blank_input_and_non_utf8_are_refused(tmp_path):
    one = keygen(tmp_path, "ed25519").with_suffix(".pub").read_text().strip()
    assert check_ssh_keys("\n".join([one] * SSH_KEYS_MAX)) == [one] * SSH_KEYS_MAX
    assert refusal(check_ssh_keys, "\n".join([one] * (SSH_KEYS_MAX + 1))) == "more than 64 SSH keys"
    big = (one + "\n" + "#" * SSH_KEYS_MAX_BYTES).encode()
    assert "at most 65536 (64 KiB)" in refusal(check_ssh_keys, big)
    assert "at most 65536 (64 KiB)" in refusal(check_ssh_keys, big.decode())
    assert "no SSH public key found" in refusal(check_ssh_keys, "# nothing\n\n")
    assert "not text (not UTF-8 at byte 0)" in refusal(check_ssh_keys, b"\xff" + one.encode())


# -- user-data -------------------------------------------------------------------------------------


def operator_multipart() -> bytes:
    msg = MIMEMultipart()
    msg.attach(MIMEText("#cloud-config\nwrite_files:\n  - path: /etc/from-mime\n    content: hi\n", "cloud-config"))
    msg.attach(MIMEText("#!/bin/sh\necho mime > /run/mime\n", "x-shellscript"))
    return msg.as_bytes()


@pytest.mark.parametrize("data", [
    b"#cloud-config\npackages: [htop]\n",
    b"#Cloud-Config\n{}\n",  # cloud-init compares without case
    b"#!/bin/sh\necho hello\n",
    "#!/bin/sh\necho h\u00e9llo \u2603\n".encode(),
    operator_multipart(),
])
def test_user_data_of_an_accepted_kind_is_kept_as_given(data):
    assert check_user_data(data) == data


def test_gzip_user_data_is_decompressed():
    plain = b"#cloud-config\nruncmd: [[touch, /run/gz]]\n"
    assert check_user_data(gzip.compress(plain)) == plain


def test_user_data_at_the_limit_is_accepted_and_one_byte_more_refused():
    at_limit = b"#!/bin/sh\n" + b"#" * (USER_DATA_MAX - 11) + b"\n"
    assert len(at_limit) == USER_DATA_MAX
    assert check_user_data(at_limit) == at_limit
    message = refusal(check_user_data, at_limit + b"\n")
    assert message == "user-data is 262145 bytes: at most 262144 (256 KiB)"


@pytest.mark.parametrize("data, cause", [
    (b"", "user-data is empty"),
    (b"hello world\n", "user-data starts with 'hello world': tenbox accepts #cloud-config, a #! script, or a MIME"),
    (b"\n#cloud-config\n", "first line is blank"),
    (b"#cloud-boothook\necho\n", "is a #cloud-boothook document"),
    (b"#cloud-config-archive\n- x\n", "is a #cloud-config-archive document"),
    (b"#include\nhttp://example.com/x\n", "is a #include document"),
    (b"## template: jinja\n#cloud-config\n", "is a ## template: jinja document"),
    (b"\xff\xfe#\x00c\x00", "not UTF-8 text (byte 0)"),
    (b"#!/bin/sh\n\x00\x01", "not text (it has NUL bytes)"),
    ("\ufeff#cloud-config\n".encode(), "byte-order mark"),
    (b"MIME-Version: 1.0\nContent-Type: text/plain\n\nhi\n", "not a multipart one"),
    (b"MIME-Version: 1.0\nContent-Type: multipart/mixed\n\nno boundary\n", "not a multipart one"),
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 8, "gzip data that does not decompress"),
    (gzip.compress(b"#cloud-config\n")[:-6], "gzip data cut short"),
    (gzip.compress(b"#!/bin/sh\n") * 2, "several gzip members"),
    (gzip.compress(b"binary\x00\xff"), "not UTF-8 text"),
])
def test_user_data_not_of_an_accepted_kind_is_refused(data, cause):
    message = refusal(check_user_data, data)
    assert cause in message, message


def test_gzip_bomb_stops_at_the_limit():
    """A few hundred bytes that would decompress to 8 MiB are refused without decompressing them all."""
    bomb = gzip.compress(b"#!/bin/sh\n" + b"\n" * (8 << 20))
    assert len(bomb) < USER_DATA_MAX
    assert "decompresses to more than 262144 bytes (256 KiB)" in refusal(check_user_data, bomb)


# -- network-config ------------------------------------------------------------------------------


V1 = b"version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: dhcp\n"
V2 = b"network:\n  version: 2\n  ethernets:\n    id0:\n      match: {name: 'en*'}\n      dhcp4: true\n"


@pytest.mark.parametrize("data", [V1, V2, b"# comment\nethernets: {}\nversion: 2\n"])
def test_network_config_v1_or_v2_is_accepted(data):
    assert check_network_config(data) == data


@pytest.mark.parametrize("data, cause", [
    (b"auto eth0\niface eth0 inet dhcp\n", "no top-level 'version:' or 'network:' line"),
    (b"ethernets:\n  version: 2\n", "no top-level"),
    (b"# version: 2\n", "no top-level"),
    (b"", "no top-level"),
    (b"version: 2\n\xc3(", "not UTF-8 text"),
    (b"version: 2\n\x00", "NUL bytes"),
    (b"version: 2\n" + b"#" * NETWORK_CONFIG_MAX, "at most 65536 (64 KiB)"),
])
def test_network_config_that_is_not_cloud_init_yaml_is_refused(data, cause):
    assert cause in refusal(check_network_config, data)


# -- the seed's files --------------------------------------------------------------------------------


def test_new_instance_ids_are_fresh_and_fit_a_guest_path():
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100
    for i in ids:
        assert cloudinit.INSTANCE_ID_RE.match(i) and i.startswith("tenbox-") and len(i) == 39


def test_meta_data_has_the_instance_id_and_host_name():
    files = seed_files(INSTANCE, "web.example", None, [], None, None)
    assert sorted(files) == ["meta-data", "user-data"]
    meta = files["meta-data"].decode()
    assert meta == 'instance-id: "%s"\nlocal-hostname: "web.example"\n' % INSTANCE
    if yaml is not None:
        assert yaml.safe_load(meta) == {"instance-id": INSTANCE, "local-hostname": "web.example"}


def test_user_and_keys_alone_make_a_cloud_config_document(tmp_path):
    keys = check_ssh_keys(keygen(tmp_path, "ed25519").with_suffix(".pub").read_bytes())
    files = seed_files(INSTANCE, "web", "alice", keys, None, V2)
    assert files["network-config"] == V2
    text = files["user-data"].decode()
    config = load_cloud_config(text)
    if config is not None:
        assert config == {"hostname": "web", "users": [
            {"name": "alice", "sudo": "ALL=(ALL) NOPASSWD:ALL", "lock_passwd": True, "ssh_authorized_keys": keys}]}
    else:
        assert '  - name: "alice"\n' in text and '      - "%s"\n' % keys[0] in text


def test_keys_without_a_user_go_to_the_images_default_user(tmp_path):
    keys = check_ssh_keys(keygen(tmp_path, "ecdsa", 256).with_suffix(".pub").read_bytes())
    text = seed_files(INSTANCE, None, None, keys, None, None)["user-data"].decode()
    config = load_cloud_config(text)
    if config is not None:
        assert config == {"ssh_authorized_keys": keys}
    else:
        assert "\nssh_authorized_keys:\n" in text and "users:" not in text


def test_nothing_given_still_makes_a_cloud_config_so_cloud_init_runs():
    files = seed_files(INSTANCE, None, None, [], None, None)
    assert files["meta-data"] == ('instance-id: "%s"\n' % INSTANCE).encode()
    config = load_cloud_config(files["user-data"].decode())
    assert config in ({}, None)


def test_key_comments_of_any_text_survive_the_yaml_quoting():
    """Quotes, backslashes, non-ASCII and astral characters in a key's comment come back unchanged."""
    comment = 'it\'s "me" \\ caf\u00e9 \u2603 \U0001f511 # not a comment: {x}'
    line = key_line("ssh-ed25519", bytes(32)).replace(" test", " " + comment)
    keys = check_ssh_keys(line)
    text = seed_files(INSTANCE, None, "alice", keys, None, None)["user-data"].decode()
    assert text.isascii()
    config = load_cloud_config(text)
    if config is not None:
        assert config["users"][0]["ssh_authorized_keys"] == [line]
    else:
        assert '\\"me\\" \\\\ caf\\xe9 \\u2603 \\U0001f511' in text


def parts_of(user_data: bytes) -> List[email.message.Message]:
    msg = email.message_from_bytes(user_data)
    assert msg.is_multipart() and msg["MIME-Version"] == "1.0"
    return [p for p in msg.walk() if not p.is_multipart()]


@pytest.mark.parametrize("theirs, ctype", [
    (b"#!/bin/sh\necho \xe2\x98\x83 > /run/x\r\n", "text/x-shellscript"),
    (b"#cloud-config\nwrite_files:\n  - path: /etc/x\n    content: y\n", "text/cloud-config"),
])
def test_user_with_operator_user_data_makes_a_multipart_ours_first(tmp_path, theirs, ctype):
    keys = check_ssh_keys(keygen(tmp_path, "ed25519").with_suffix(".pub").read_bytes())
    user_data = seed_files(INSTANCE, "web", "alice", keys, theirs, None)["user-data"]
    ours, operators = parts_of(user_data)
    assert ours.get_content_type() == "text/cloud-config"
    assert ours["Content-Transfer-Encoding"] == "7bit"  # readable in the seed
    config = load_cloud_config(ours.get_payload(decode=True).decode())
    if config is not None:
        assert config["users"][0]["name"] == "alice" and config["users"][0]["ssh_authorized_keys"] == keys
    assert operators.get_content_type() == ctype
    assert operators.get_payload(decode=True) == theirs  # byte for byte, CRLF and all


def test_operator_multipart_is_nested_whole_after_ours():
    theirs = operator_multipart()
    user_data = seed_files(INSTANCE, None, "alice", [], theirs, None)["user-data"]
    parts = parts_of(user_data)
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/cloud-config",
                                                     "text/x-shellscript"]
    want = [p.get_payload(decode=True) for p in email.message_from_bytes(theirs).walk() if not p.is_multipart()]
    assert [p.get_payload(decode=True) for p in parts[1:]] == want


def test_operator_user_data_alone_is_seeded_as_given_and_gzip_as_its_text():
    theirs = b"#cloud-config\nhostname: theirs\n"
    assert seed_files(INSTANCE, "web", None, [], theirs, None)["user-data"] == theirs
    assert seed_files(INSTANCE, "web", None, [], gzip.compress(theirs), None)["user-data"] == theirs


def test_seed_files_checks_its_inputs_again():
    assert "instance-id" in refusal(seed_files, "../etc", None, None, [], None, None)
    assert "hostname" in refusal(seed_files, INSTANCE, "bad_host", None, [], None, None)
    assert "root" in refusal(seed_files, INSTANCE, None, "root", [], None, None)
    assert "SSH key line 1" in refusal(seed_files, INSTANCE, None, None, ["ssh-rsa AAAA"], None, None)
    assert "user-data" in refusal(seed_files, INSTANCE, None, None, [], b"plain", None)
    assert "network-config" in refusal(seed_files, INSTANCE, None, None, [], None, b"auto eth0\n")


# -- the seed disk -------------------------------------------------------------------------------


def extract_iso(iso: Path, out: Path) -> Dict[str, bytes]:
    """The files of `iso`, as xorriso's own reader (osirrox) extracts them."""
    subprocess.run(["xorriso", "-no_rc", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(out)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=60)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def full_seed(tmp_path: Path) -> Dict[str, bytes]:
    keys = check_ssh_keys(keygen(tmp_path, "ed25519").with_suffix(".pub").read_bytes())
    return seed_files(INSTANCE, "web", "alice", keys, b"#!/bin/sh\ntouch /run/first-boot\n", V2)


@needs_xorriso
def test_seed_disk_is_a_cidata_iso_holding_the_files(tmp_path):
    files = full_seed(tmp_path)
    folder = tmp_path / "vm"
    folder.mkdir()
    iso = build_seed(folder, files)
    assert iso == folder / "seed.iso"
    assert sorted(os.listdir(str(folder))) == ["seed.iso"]  # no staging left
    assert iso.stat().st_mode & 0o777 == 0o600
    assert extract_iso(iso, tmp_path / "out") == files
    probe = subprocess.run(["blkid", "-p", "-o", "export", str(iso)], check=True, stdout=subprocess.PIPE,
                           timeout=60).stdout.decode().splitlines()
    assert "TYPE=iso9660" in probe and "LABEL=cidata" in probe
    assert "VERSION=Joliet\\ Extension" in probe
    pvd = subprocess.run(["xorriso", "-no_rc", "-indev", str(iso), "-pvd_info"], check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60).stdout.decode()
    assert "Volume Id    : cidata\n" in pvd
    # Rock Ridge's extension record names the RRIP version it follows (1.10 or 1.12).
    raw = iso.read_bytes()
    assert b"RRIP_1991A" in raw or b"IEEE_P1282" in raw or b"IEEE_1282" in raw


@needs_xorriso
def test_seed_disk_is_replaced_whole_on_reprovisioning(tmp_path):
    first = seed_files(INSTANCE, "one", None, [], None, None)
    second = seed_files(new_instance_id(), "two", None, [], None, None)
    build_seed(tmp_path, first)
    iso = build_seed(tmp_path, second)
    assert extract_iso(iso, tmp_path / "out") == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "seed.iso"]


def fake_tool(tmp_path: Path, monkeypatch, script: str) -> None:
    """A `xorriso` first on PATH that runs `script` (sh) instead of making a disk."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "xorriso"
    tool.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def seed_folder_with_an_old_seed(tmp_path: Path) -> Path:
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "seed.iso").write_bytes(b"the old seed")
    return folder


def test_failing_tool_leaves_the_folder_as_it_was_and_says_why(tmp_path, monkeypatch):
    """xorriso writes part of its output, fails: the old seed stays, no partial file, its FAILURE line told."""
    fake_tool(tmp_path, monkeypatch, """
        while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
        echo partial > "$out"
        echo "xorriso : FAILURE : Cannot write to disk: No space left on device" >&2
        echo "xorriso : aborting : -abort_on 'FAILURE' encountered 'FAILURE'" >&2
        exit 5
        """)
    folder = seed_folder_with_an_old_seed(tmp_path)
    with pytest.raises(SeedBuildError) as info:
        build_seed(folder, seed_files(INSTANCE, "web", None, [], None, None))
    assert str(info.value) == ("xorriso failed making the seed disk (exit 5): xorriso : FAILURE : Cannot write"
                               " to disk: No space left on device")
    assert os.listdir(str(folder)) == ["seed.iso"] and (folder / "seed.iso").read_bytes() == b"the old seed"


def test_tool_that_writes_nothing_or_hangs_leaves_nothing(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, "exit 0\n")
    folder = tmp_path / "vm"
    folder.mkdir()
    files = seed_files(INSTANCE, None, None, [], None, None)
    with pytest.raises(SeedBuildError, match="exited 0 but wrote no seed disk"):
        build_seed(folder, files)
    assert os.listdir(str(folder)) == []
    (tmp_path / "bin" / "xorriso").write_text("#!/bin/sh\nexec sleep 60\n")
    monkeypatch.setattr(cloudinit, "SEED_TOOL_TIMEOUT_SEC", 0.5)
    with pytest.raises(SeedBuildError, match="did not finish making the seed disk within 0.5 s"):
        build_seed(folder, files)
    assert os.listdir(str(folder)) == []


def test_missing_tool_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no xorriso there
    folder = seed_folder_with_an_old_seed(tmp_path)
    with pytest.raises(SeedBuildError) as info:
        build_seed(folder, seed_files(INSTANCE, None, None, [], None, None))
    assert str(info.value) == "xorriso not found: install Debian's xorriso package to make cloud-init seed disks"
    assert os.listdir(str(folder)) == ["seed.iso"]


@pytest.mark.parametrize("files, cause", [
    ({"user-data": b"#cloud-config\n"}, "needs meta-data"),
    ({"meta-data": b"", "user-data": b"", "../x": b""}, "not a NoCloud seed file"),
    ({"meta-data": b"", "user-data": "text"}, "not bytes"),
    ({"meta-data": b"", "user-data": bytes(cloudinit.SEED_BYTES_MAX + 1)}, "at most"),
])
def test_build_seed_refuses_files_that_are_no_seed(tmp_path, files, cause):
    with pytest.raises(ValueError, match=cause):
        build_seed(tmp_path, files)
    assert os.listdir(str(tmp_path)) == []


# -- cloud-init itself as the oracle ----------------------------------------------------------------

# Debian's cloud-init and what its NoCloud datasource, user-data processor and user handling import,
# python3-yaml too (C parts and all: the host's own Python is the release's). A name a release lacks is
# passed over; an import that then fails fails the oracle's tests, naming the module.
ORACLE_PACKAGES = ("cloud-init", "python3-yaml", "python3-requests", "python3-urllib3", "python3-idna",
                   "python3-certifi", "python3-chardet", "python3-charset-normalizer", "python3-configobj",
                   "python3-six", "python3-jsonpatch", "python3-json-pointer")
ORACLE_SCRIPT = r'''
import json, os, sys
from cloudinit import distros, handlers, helpers, util
from cloudinit.distros import ug_util
from cloudinit.handlers.cloud_config import CloudConfigPartHandler
from cloudinit.sources import DataSourceNoCloud

work = sys.argv[1]
paths = helpers.Paths({"cloud_dir": os.path.join(work, "cloud"), "run_dir": os.path.join(work, "run")})
# No device probing: the seed is read from cloud_dir/seed/nocloud, as NoCloud reads a mounted cidata.
ds = DataSourceNoCloud.DataSourceNoCloud({"datasource": {"NoCloud": {"fs_label": None}}}, None, paths)
found = ds.get_data()
parts = []
handler = CloudConfigPartHandler(paths)
handler.cloud_fn = os.path.join(work, "cloud-config.txt")
handler.handle_part(None, handlers.CONTENT_START, None, None, None, None)
for part in ds.get_userdata().walk():
    if part.get_content_maintype() == "multipart":
        continue
    payload = part.get_payload(decode=True).decode("utf-8")
    parts.append([part.get_content_type(), payload])
    if part.get_content_type() == "text/cloud-config":
        handler.handle_part(None, "text/cloud-config", part.get_filename(), payload, None, dict(part))
handler.handle_part(None, handlers.CONTENT_END, None, None, None, None)
config = util.load_yaml(open(handler.cloud_fn).read())
distro = distros.fetch("debian")("debian", {}, paths)
users = ug_util.normalize_users_groups(config, distro)[0]
hostname = ds.get_hostname()
print(json.dumps({
    "found": found, "instance_id": ds.get_instance_id(), "hostname": getattr(hostname, "hostname", hostname),
    "metadata": ds.metadata, "network_config": ds.network_config, "parts": parts, "config": config,
    "users": users,
}))
'''


def _candidate(package: str) -> str:
    out = subprocess.run(["apt-cache", "policy", package], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         timeout=60).stdout.decode()
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            return "" if version == "(none)" else version
    return ""


@pytest.fixture(scope="module")
def cloud_init_root() -> Path:
    """Debian's cloud-init and its imports, unpacked (apt-get download, dpkg-deb -x) under .cache; the PYTHONPATH.

    The oracle's tests fail, saying why, where apt cannot fetch them (no
    package lists, no mirror) or cloud-init's modules do not import from
    them: the CI machine has Debian's mirror, so nothing here is skipped.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.fail("cloud-init oracle: apt-get or dpkg-deb missing (not Debian)")
    version = _candidate("cloud-init")
    if not version:
        pytest.fail("cloud-init oracle: cloud-init not in apt's package lists (run 'apt-get update')")
    root = CACHE / "cloud-init" / ("%s-py%d.%d" % (version.replace(":", "_"), *sys.version_info[:2]))
    site = root / "usr" / "lib" / "python3" / "dist-packages"
    if not (root / ".complete").exists():
        shutil.rmtree(str(root), ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        dl = root.parent / (".dl-%d" % os.getpid())
        shutil.rmtree(str(dl), ignore_errors=True)
        dl.mkdir()
        dl.chmod(0o755)  # apt-get download as root hands the transfer to _apt
        try:
            for package in ORACLE_PACKAGES:
                if _candidate(package):
                    subprocess.run(["apt-get", "download", "-q", package], cwd=str(dl), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
            debs = sorted(dl.glob("*.deb"))
            if not any(d.name.startswith("cloud-init_") for d in debs):
                pytest.fail("cloud-init oracle: apt-get download cloud-init failed (no mirror?)")
            staged = dl / "root"
            for deb in debs:
                subprocess.run(["dpkg-deb", "-x", str(deb), str(staged)], check=True, timeout=300)
            (staged / ".complete").write_text("\n".join(d.name for d in debs) + "\n")
            os.replace(str(staged), str(root))
        finally:
            shutil.rmtree(str(dl), ignore_errors=True)
    probe = subprocess.run([PYTHON, "-c", "from cloudinit.sources import DataSourceNoCloud; "
                            "from cloudinit.handlers.cloud_config import CloudConfigPartHandler; "
                            "from cloudinit.distros import ug_util"],
                           env={"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        pytest.fail("cloud-init oracle: its modules do not import here: %s" % last)
    return site


def cloud_init_reads(site: Path, iso: Path, work: Path) -> Dict[str, Any]:
    """What cloud-init's NoCloud datasource makes of the seed disk `iso`, as JSON."""
    extract_iso(iso, work / "cloud" / "seed" / "nocloud")
    done = subprocess.run([PYTHON, "-c", ORACLE_SCRIPT, str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return json.loads(done.stdout.decode())


@needs_xorriso
def test_cloud_init_reads_the_seed_as_tenbox_meant(tmp_path, cloud_init_root):
    """cloud-init's own NoCloud code: instance-id, host name, the user with sudo and keys, the script, network."""
    keys = check_ssh_keys(keygen(tmp_path, "ed25519").with_suffix(".pub").read_bytes())
    script = b"#!/bin/sh\ntouch /run/first-boot\n"
    iso = build_seed(tmp_path, seed_files(INSTANCE, "web.example", "alice", keys, script, V2))
    seen = cloud_init_reads(cloud_init_root, iso, tmp_path / "ci")
    assert seen["found"] is True
    assert seen["instance_id"] == INSTANCE
    assert seen["metadata"]["local-hostname"] == "web.example"
    assert seen["hostname"] == "web"  # cloud-init's short name of local-hostname
    network = seen["network_config"]
    network = network.get("network", network)  # cloud-init 22.4 keeps the 'network:' wrapper, later ones drop it
    assert network == {"version": 2, "ethernets": {"id0": {"match": {"name": "en*"}, "dhcp4": True}}}
    assert [p[0] for p in seen["parts"]] == ["text/cloud-config", "text/x-shellscript"]
    assert seen["parts"][1][1] == script.decode()
    assert seen["config"]["hostname"] == "web.example"
    assert seen["users"] == {"alice": {"sudo": "ALL=(ALL) NOPASSWD:ALL", "lock_passwd": True,
                                       "ssh_authorized_keys": keys, "default": False}}


@needs_xorriso
def test_cloud_init_merges_the_operators_cloud_config_after_ours(tmp_path, cloud_init_root):
    """Operator keys are added; a key both set (hostname) is the operator's."""
    theirs = gzip.compress(b"#cloud-config\nhostname: theirs\nwrite_files:\n  - path: /etc/x\n    content: y\n")
    iso = build_seed(tmp_path, seed_files(INSTANCE, "web", "alice", [], theirs, None))
    seen = cloud_init_reads(cloud_init_root, iso, tmp_path / "ci")
    assert seen["network_config"] is None
    assert seen["config"]["hostname"] == "theirs"
    assert seen["config"]["write_files"] == [{"path": "/etc/x", "content": "y"}]
    assert list(seen["users"]) == ["alice"]


@needs_xorriso
def test_cloud_init_reads_the_minimal_seed(tmp_path, cloud_init_root):
    """Nothing given: cloud-init still finds the datasource, with an empty config and no user made."""
    iso = build_seed(tmp_path, seed_files(INSTANCE, None, None, [], None, None))
    seen = cloud_init_reads(cloud_init_root, iso, tmp_path / "ci")
    assert seen["found"] is True and seen["instance_id"] == INSTANCE
    assert seen["config"] == {} and seen["users"] == {}
