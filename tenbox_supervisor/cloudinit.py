"""cloud-init NoCloud seeds (daemon, root): the operator's provisioning inputs checked, and the `cidata` disk built.

A VM made from a cloud image is provisioned at its first boot by the
image's own cloud-init, from a small read-only disk labelled `cidata` (the
NoCloud datasource) that holds `meta-data`, `user-data` and, when given,
`network-config`. This module

- checks what an operator gives `vm create`: host name (RFC 1123), user name
  (what Debian's adduser accepts), SSH public keys, user-data and
  network-config. Every refusal is a `ProvisionError` whose message is one
  line naming the cause;
- makes the seed's files (`seed_files`): meta-data with the VM's
  instance-id and host name, user-data combining tenbox's cloud-config part
  (the user, its keys, the host name) with the operator's own;
- writes the seed disk (`build_seed`): an ISO 9660 image with Joliet and
  Rock Ridge, volume id `cidata`, made by xorriso (`xorriso -as mkisofs`),
  never by a file system written by hand. A failure is a `SeedBuildError`
  and leaves nothing in the VM folder.

Why xorriso: Debian 11, 12 and 13 all ship both xorriso (1.5.2, 1.5.4,
1.5.6) and genisoimage (cdrkit 1.1.11 in all three). cdrkit has had no
release since 2010 and lives on in Debian as patches; xorriso (libburnia:
libisofs, libburn) is maintained upstream and is what Debian's own
debian-cd and live-build use to make ISO images. It also reads images
back (`-osirrox`), which the tests use as the oracle.

Why ISO 9660 and not vfat: cloud-init looks for both; an ISO is read-only
by construction (the guest cannot write its seed back), is what
cloud-localds, virt-install and QEMU's documentation make, and xorriso
makes it from a folder without a loop mount or root.

Limits (the inputs arrive in one control request: protocol.REQUEST_MAX_BYTES
is 1 MiB, and USER_DATA_MAX + NETWORK_CONFIG_MAX + SSH_KEYS_MAX_BYTES fit in
it with room for the rest of the request):

- USER_DATA_MAX, 256 KiB: at least what every cloud accepts, so user-data
  written for a cloud works here unchanged. Amazon EC2 takes 16 KiB (before
  base64), OpenStack Nova 64 KiB (base64-encoded, so ~48 KiB of content),
  Azure's custom data 64 KiB, DigitalOcean 64 KiB, Google Compute Engine
  256 KiB per metadata value. Larger payloads belong on the network
  (`#include` a URL, or fetch from a script), not in a seed disk.
- NETWORK_CONFIG_MAX, 64 KiB: a network-config for dozens of interfaces,
  bonds and VLANs is a few KiB.
- SSH_KEYS_MAX_BYTES, 64 KiB, and SSH_KEYS_MAX, 64 keys: an 8192-bit RSA
  public key line is about 1.4 KiB, so 64 of the largest fit.

Decisions:

- the user name `root` is refused: tenbox's cloud-config makes a new user
  with a sudo rule, and applying that to root makes no sense (cloud-init's
  `disable_root`, on by default, would also turn root's keys into a "log in
  as another user" message). An operator who wants root logins gives the
  keys through their own user-data with `disable_root: false`.
- gzip-compressed user-data (which cloud-init accepts) is accepted and
  decompressed here, bounded: the decompressed text must itself be within
  USER_DATA_MAX and of an accepted kind. The seed then carries the plain
  text, so it can be checked and combined with tenbox's part.
- accepted kinds of user-data: `#cloud-config`, a `#!` script, or a MIME
  multipart message (the first line, compared as cloud-init compares it:
  case-insensitive, longest prefix). cloud-init's other kinds
  (`#include`, `#cloud-boothook`, `#cloud-config-archive`, `#part-handler`,
  `## template: jinja`, ...) are refused at the top level; they work as
  parts of a MIME multipart message, whose parts tenbox does not inspect.
- network-config is checked without a YAML parser (tenbox does not depend
  on PyYAML): it must be UTF-8 text with a top-level `version:` or
  `network:` line (v1, v2, or either wrapped in `network:`). Its YAML is
  cloud-init's to parse; a file that is not YAML at all is refused here.
- the user is made with a sudo rule (no password), a locked password and
  the keys, and the image's default shell for new users (useradd's): tenbox
  does not assume bash. With keys and no user, the keys go to the image's
  default user (debian, ubuntu) as cloud-init's top-level
  `ssh_authorized_keys`.
- when the operator gives user-data as well as a user or keys, the two are
  combined into a MIME multipart message, tenbox's part first. cloud-init
  merges cloud-config parts in order with its default merger
  (`dict(replace)+list()+str()`): a key the operator's part also sets (their
  own `users:`, say) replaces tenbox's.
"""

from __future__ import annotations

import base64
import hashlib
import binascii
import email
import logging
import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
import zlib
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tenbox_supervisor.fsutil import fsync_dir
from tenbox_supervisor.modes import PRIVATE_FILE_MODE
from tenbox_supervisor.spec import SEED_KEY

log = logging.getLogger("tenboxd.cloudinit")

HOSTNAME_MAX = 253  # RFC 1123 2.1 (and RFC 1035 2.3.4)
HOSTNAME_LABEL_MAX = 63
USER_MAX = 32  # useradd's limit on Debian (and utmp's ut_user)
USER_RE = re.compile(r"[a-z][-a-z0-9_]*\Z")  # adduser's default NAME_REGEX, without the Samba '$'
SSH_KEYS_MAX_BYTES = 64 << 10
SSH_KEYS_MAX = 64
SSH_RSA_MIN_BITS = 1024  # OpenSSH 8.8+ refuses smaller RSA keys (SSH_RSA_MINIMUM_MODULUS_SIZE)
USER_DATA_MAX = 256 << 10  # see the module docstring for the clouds' limits
NETWORK_CONFIG_MAX = 64 << 10
SEED_BYTES_MAX = 1 << 20  # all of a seed's files together (user-data grows by a third in base64 MIME parts)
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # a folder name in the guest's /var/lib/cloud

SEED_ISO = "seed.iso"
SEED_VOLUME_ID = "cidata"  # the label cloud-init's NoCloud looks for (in either case)
SEED_NAMES = ("meta-data", "user-data", "network-config", "vendor-data")
SEED_REQUIRED = ("meta-data", "user-data")  # NoCloud ignores a seed without both
SEED_TOOL = "xorriso"
SEED_TOOL_PACKAGE = "xorriso"  # Debian 11, 12 and 13
# A seed is under 1 MiB and xorriso makes it in ~0.1 s; 30 s is a stalled disk, not a slow one.
SEED_TOOL_TIMEOUT_SEC = 30.0
# The tool runs with this environment only: no LD_PRELOAD, locale or HOME of the daemon's.
SEED_TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

ACCEPTED_KINDS = "#cloud-config, a #! script, or a MIME multipart message"
SUDO_RULE = "ALL=(ALL) NOPASSWD:ALL"
MIME_LINE_MAX = 998  # RFC 5322 2.1.1, for a 7-bit part

_GZIP_MAGIC = b"\x1f\x8b"
_PRIVATE_KEY_RE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----|^PuTTY-User-Key-File-", re.MULTILINE)
_RFC4716_RE = re.compile(r"^---- BEGIN SSH2 PUBLIC KEY ----", re.MULTILINE)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NETWORK_TOP_RE = re.compile(r"^(version|network)[ \t]*:", re.MULTILINE)
_LABEL_RE = re.compile(r"[A-Za-z0-9-]+\Z")
_BAD_LABEL_CHAR_RE = re.compile(r"[^A-Za-z0-9-]")
_DIGITS_RE = re.compile(r"[0-9]+\Z")

# cloud-init's user-data kinds, by the start of the text (cloudinit/handlers INCLUSION_TYPES_MAP),
# longest first as cloud-init matches them. Only cloud-config and script are accepted at the top
# level; a MIME message is found by its MIME-Version header (_user_data_kind).
_KINDS: Tuple[Tuple[str, str], ...] = tuple(sorted((
    ("#cloud-config", "cloud-config"),
    ("#!", "script"),
    ("#cloud-config-archive", "#cloud-config-archive"),
    ("#cloud-config-jsonp", "#cloud-config-jsonp"),
    ("#cloud-boothook", "#cloud-boothook"),
    ("#include", "#include"),
    ("#include-once", "#include-once"),
    ("#part-handler", "#part-handler"),
    ("## template: jinja", "## template: jinja"),
), key=lambda kv: -len(kv[0])))
_MIME_SUBTYPE = {"cloud-config": "cloud-config", "script": "x-shellscript"}

# Each key type: (the fields of its blob after the type string, in order), and the curve
# an ECDSA key must name. Field kinds: "string", "mpint", or an int for a string of that length.
_KEY_TYPES: Dict[str, Tuple[Tuple[Union[str, int], ...], Optional[str]]] = {
    "ssh-ed25519": ((32,), None),
    "ssh-rsa": (("mpint", "mpint"), None),
    "ecdsa-sha2-nistp256": (("string", "string"), "nistp256"),
    "ecdsa-sha2-nistp384": (("string", "string"), "nistp384"),
    "ecdsa-sha2-nistp521": (("string", "string"), "nistp521"),
    "sk-ssh-ed25519@openssh.com": ((32, "string"), None),
    "sk-ecdsa-sha2-nistp256@openssh.com": (("string", "string", "string"), "nistp256"),
}
# An uncompressed point (0x04, x, y), the only form OpenSSH writes or reads.
_EC_POINT_BYTES = {"nistp256": 65, "nistp384": 97, "nistp521": 133}


class ProvisionError(Exception):
    """An operator's provisioning input refused; the message is one line naming the cause."""


class SeedBuildError(Exception):
    """The seed disk could not be made (tool missing, failed or stalled); one line, nothing left behind."""


def _show(value: str, limit: int = 64) -> str:
    """A value for a message: quoted, escaped to one line, cut to `limit` characters."""
    if len(value) > limit:
        return repr(value[:limit])[:-1] + "...'"
    return repr(value)


# -- host and user names ---------------------------------------------------------------------


def check_hostname(name: str) -> str:
    """`name` if it is a host name per RFC 1123, else ProvisionError naming the rule it breaks."""
    if not isinstance(name, str) or not name:
        raise ProvisionError("hostname is empty")
    if len(name) > HOSTNAME_MAX:
        raise ProvisionError("hostname is %d characters: RFC 1123 allows at most %d" % (len(name), HOSTNAME_MAX))
    if name.endswith("."):
        raise ProvisionError("hostname %s ends with '.': give it without the trailing dot" % _show(name))
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ProvisionError("hostname %s has an empty label (a leading dot or two dots in a row)" % _show(name))
        if len(label) > HOSTNAME_LABEL_MAX:
            raise ProvisionError("hostname label %s is %d characters: RFC 1123 allows at most %d"
                                 % (_show(label), len(label), HOSTNAME_LABEL_MAX))
        if not _LABEL_RE.match(label):
            bad = _BAD_LABEL_CHAR_RE.search(label)
            assert bad is not None
            raise ProvisionError("hostname %s has %s: RFC 1123 allows only letters, digits and '-'"
                                 % (_show(name), _show(bad.group())))
        if label.startswith("-") or label.endswith("-"):
            raise ProvisionError("hostname label %s %s with '-': RFC 1123 labels start and end with a letter or digit"
                                 % (_show(label), "starts" if label.startswith("-") else "ends"))
    if len(labels) == 4 and all(_DIGITS_RE.match(lb) for lb in labels):
        raise ProvisionError("hostname %s is an IPv4 address, not a host name (RFC 1123 2.1)" % _show(name))
    return name


def check_user(name: str) -> str:
    """`name` if Debian's adduser accepts it by default and it is not root, else ProvisionError."""
    if not isinstance(name, str) or not name:
        raise ProvisionError("user name is empty")
    if len(name) > USER_MAX:
        raise ProvisionError("user name is %d characters: at most %d" % (len(name), USER_MAX))
    if not USER_RE.match(name):
        raise ProvisionError("user name %s is not one Debian's adduser accepts: a lowercase letter, then lowercase"
                             " letters, digits, '-' or '_' (^[a-z][-a-z0-9_]*$)" % _show(name))
    if name == "root":
        raise ProvisionError("user name 'root' is refused: tenbox makes a new sudo user; to log in as root, give"
                             " the keys in --user-data with 'disable_root: false'")
    return name


# -- SSH keys ---------------------------------------------------------------------------------


def _read_blob_fields(blob: bytes, key_type: str) -> None:
    """Check an OpenSSH public key blob (RFC 4253 6.6 and OpenSSH's PROTOCOL.u2f) for `key_type`.

    Raises ValueError with the reason; the caller adds the line number.
    """
    def string(pos: int) -> Tuple[bytes, int]:
        if pos + 4 > len(blob):
            raise ValueError("its key data is cut short")
        (n,) = struct.unpack_from(">I", blob, pos)
        if pos + 4 + n > len(blob):
            raise ValueError("its key data is cut short")
        return blob[pos + 4:pos + 4 + n], pos + 4 + n

    embedded, pos = string(0)
    if embedded != key_type.encode():
        raise ValueError("its key data is a %s key, not %s"
                         % (_show(embedded.decode("ascii", "replace"), 40), key_type))
    fields, curve = _KEY_TYPES[key_type]
    values: List[bytes] = []
    for kind in fields:
        value, pos = string(pos)
        if isinstance(kind, int) and len(value) != kind:
            raise ValueError("its public key is %d bytes, not %d" % (len(value), kind))
        if kind == "mpint" and value[:1] and value[0] & 0x80:
            raise ValueError("its key data has a negative number")
        values.append(value)
    if pos != len(blob):
        raise ValueError("its key data has %d bytes too many" % (len(blob) - pos))
    if key_type == "ssh-rsa":
        bits = int.from_bytes(values[1], "big").bit_length()
        if bits < SSH_RSA_MIN_BITS:
            raise ValueError("it is a %d-bit RSA key: OpenSSH refuses RSA keys under %d bits"
                             % (bits, SSH_RSA_MIN_BITS))
    if curve is not None:
        if values[0] != curve.encode():
            raise ValueError("its key data names curve %s, not %s"
                             % (_show(values[0].decode("ascii", "replace"), 40), curve))
        if len(values[1]) != _EC_POINT_BYTES[curve] or values[1][:1] != b"\x04":
            raise ValueError("its public point is not an uncompressed %s point" % curve)


def check_ssh_keys(text: Union[str, bytes]) -> List[str]:
    """The OpenSSH public key lines of `text` (a .pub or authorized_keys-style file), each "type base64 [comment]".

    Blank lines and lines starting with '#' are skipped. Every other line
    must be a public key of a known type whose base64 data decodes to a
    key of that same type; options before the type (as authorized_keys
    allows) are not accepted. A private key, or a public key in the
    RFC 4716 format, is refused with a line saying what to give instead.
    """
    if isinstance(text, bytes):
        if len(text) > SSH_KEYS_MAX_BYTES:
            raise ProvisionError("SSH keys are %d bytes: at most %d (%d KiB)"
                                 % (len(text), SSH_KEYS_MAX_BYTES, SSH_KEYS_MAX_BYTES >> 10))
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProvisionError("SSH keys are not text (not UTF-8 at byte %d)" % e.start) from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > SSH_KEYS_MAX_BYTES:
        raise ProvisionError("SSH keys are %d bytes: at most %d (%d KiB)"
                             % (size, SSH_KEYS_MAX_BYTES, SSH_KEYS_MAX_BYTES >> 10))
    if _PRIVATE_KEY_RE.search(text):
        raise ProvisionError("SSH key is a private key: give the public key (the .pub file) instead, and keep the"
                             " private key secret")
    if _RFC4716_RE.search(text):
        raise ProvisionError("SSH key is in the RFC 4716 format: convert it with 'ssh-keygen -i -f FILE'")
    keys: List[str] = []
    for number, raw_line in enumerate(text.split("\n"), 1):
        line = raw_line.rstrip("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        where = "SSH key line %d" % number
        if _CONTROL_RE.search(line):
            raise ProvisionError("%s has a control character" % where)
        parts = line.split(None, 2)
        key_type = parts[0]
        if key_type not in _KEY_TYPES:
            raise ProvisionError("%s: %s is not a public key type tenbox accepts (%s)"
                                 % (where, _show(key_type, 40), ", ".join(sorted(_KEY_TYPES))))
        if len(parts) < 2:
            raise ProvisionError("%s: %s with no key data after it" % (where, key_type))
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except binascii.Error:
            raise ProvisionError("%s: its key data is not base64" % where) from None
        try:
            _read_blob_fields(blob, key_type)
        except ValueError as e:
            raise ProvisionError("%s: %s" % (where, e)) from None
        if len(keys) == SSH_KEYS_MAX:
            raise ProvisionError("more than %d SSH keys" % SSH_KEYS_MAX)
        keys.append(" ".join(parts))
    if not keys:
        raise ProvisionError("no SSH public key found (only blank or comment lines)")
    return keys


# -- user-data and network-config -------------------------------------------------------------


def _gunzip(data: bytes, what: str, limit: int) -> bytes:
    """`data` decompressed (gzip), refused past `limit` bytes: a small bomb stops at the limit."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise ProvisionError("%s is gzip data that does not decompress: %s" % (what, e)) from None
    if len(out) > limit:
        raise ProvisionError("%s decompresses to more than %d bytes (%d KiB), the limit" % (what, limit, limit >> 10))
    if not d.eof:
        raise ProvisionError("%s is gzip data cut short" % what)
    if d.unused_data:
        raise ProvisionError("%s has bytes after its gzip data (several gzip members are not accepted)" % what)
    return out


def _text(data: bytes, what: str, accepted: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProvisionError("%s is not UTF-8 text (byte %d): tenbox accepts %s" % (what, e.start, accepted)) from None
    if "\x00" in text:
        raise ProvisionError("%s is not text (it has NUL bytes): tenbox accepts %s" % (what, accepted))
    if text.startswith("\ufeff"):
        raise ProvisionError("%s starts with a byte-order mark, which hides its first line from cloud-init:"
                             " save it without one" % what)
    return text


def _user_data_kind(text: str) -> str:
    """"cloud-config", "script" or "multipart", as cloud-init would see `text`; else ProvisionError."""
    if not text.strip():
        raise ProvisionError("user-data is empty: tenbox accepts %s" % ACCEPTED_KINDS)
    lowered = text[:64].lower()
    for start, kind in _KINDS:
        if lowered.startswith(start):
            if kind in _MIME_SUBTYPE:
                return kind
            raise ProvisionError("user-data is a %s document: tenbox accepts %s (put it in a MIME part)"
                                 % (kind, ACCEPTED_KINDS))
    # cloud-init takes user-data for MIME when "mime-version:" is in its first 4096 bytes.
    if "mime-version:" in text[:4096].lower():
        msg = email.message_from_string(text)
        if not msg.is_multipart():
            raise ProvisionError("user-data is a MIME message but not a multipart one (or its boundary is"
                                 " missing): tenbox accepts %s" % ACCEPTED_KINDS)
        if not msg.get_payload():
            raise ProvisionError("user-data is a MIME multipart message with no parts")
        return "multipart"
    first = text.split("\n", 1)[0].strip()
    if not first:
        raise ProvisionError("user-data's first line is blank: it must start %s" % ACCEPTED_KINDS)
    raise ProvisionError("user-data starts with %s: tenbox accepts %s" % (_show(first, 40), ACCEPTED_KINDS))


def check_user_data(data: bytes) -> bytes:
    """The user-data to seed: `data` itself, or its decompressed text if it was gzip'd; else ProvisionError.

    At most USER_DATA_MAX bytes, compressed or not; UTF-8 text of an
    accepted kind (ACCEPTED_KINDS).
    """
    if len(data) > USER_DATA_MAX:
        raise ProvisionError("user-data is %d bytes: at most %d (%d KiB)"
                             % (len(data), USER_DATA_MAX, USER_DATA_MAX >> 10))
    if data.startswith(_GZIP_MAGIC):
        data = _gunzip(data, "user-data", USER_DATA_MAX)
    _user_data_kind(_text(data, "user-data", ACCEPTED_KINDS))
    return data


def check_network_config(data: bytes) -> bytes:
    """`data` if it can be a cloud-init network-config (v1 or v2 YAML), else ProvisionError.

    Checked without parsing YAML: UTF-8 text, at most NETWORK_CONFIG_MAX
    bytes, with a top-level `version:` or `network:` line.
    """
    if len(data) > NETWORK_CONFIG_MAX:
        raise ProvisionError("network-config is %d bytes: at most %d (%d KiB)"
                             % (len(data), NETWORK_CONFIG_MAX, NETWORK_CONFIG_MAX >> 10))
    text = _text(data, "network-config", "cloud-init's network config YAML, version 1 or 2")
    if not _NETWORK_TOP_RE.search(text):
        raise ProvisionError("network-config has no top-level 'version:' or 'network:' line: it must be"
                             " cloud-init's network config YAML, version 1 or 2")
    return data


# -- the seed's files -------------------------------------------------------------------------


def new_instance_id() -> str:
    """A fresh instance-id: a new one makes the guest's cloud-init provision again at the next boot."""
    return "tenbox-" + secrets.token_hex(16)


def _yaml_str(value: str) -> str:
    """`value` as a YAML double-quoted scalar of ASCII characters, which any YAML reader reads back unchanged.

    Escapes the quote, the backslash, controls, and everything past ASCII
    (\\xXX, \\uXXXX, \\UXXXXXXXX: YAML 1.1 and 1.2 both have them), so the
    cloud-config part stays 7-bit text a person can read in the seed.
    """
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code <= 0x7E:
            out.append(ch)
        elif code <= 0xFF:
            out.append("\\x%02x" % code)
        elif code <= 0xFFFF:
            out.append("\\u%04x" % code)
        else:
            out.append("\\U%08x" % code)
    out.append('"')
    return "".join(out)


def _cloud_config(hostname: Optional[str], user: Optional[str], ssh_keys: Sequence[str]) -> str:
    """tenbox's own #cloud-config document: the host name, the user with sudo and its keys."""
    lines = ["#cloud-config", "# made by tenbox: the VM's user, its SSH keys and its host name"]
    if hostname:
        lines.append("hostname: %s" % _yaml_str(hostname))
    if user:
        # Only this user: no "default" entry, so the image's default user (debian, ubuntu) is not made.
        lines += [
            "users:",
            "  - name: %s" % _yaml_str(user),
            "    sudo: %s" % _yaml_str(SUDO_RULE),
            "    lock_passwd: true",
        ]
        if ssh_keys:
            lines.append("    ssh_authorized_keys:")
            lines += ["      - %s" % _yaml_str(k) for k in ssh_keys]
    elif ssh_keys:
        # No user named: cloud-init gives these keys to the image's default user.
        lines.append("ssh_authorized_keys:")
        lines += ["  - %s" % _yaml_str(k) for k in ssh_keys]
    if len(lines) == 2:
        lines.append("{}")  # nothing to set, but a document cloud-init reads as a mapping
    return "\n".join(lines) + "\n"


def _mime_text(data: bytes, subtype: str, filename: str, readable: bool = False) -> MIMEText:
    """A text/`subtype` part holding `data`.

    base64 keeps the bytes exactly as given (line ends, long lines, any
    UTF-8): the operator's parts. `readable` asks for 7-bit text where the
    data allows it (ASCII, lines within RFC 5322's 998): tenbox's own part,
    so a person reading the seed sees it.
    """
    text = data.decode("utf-8")
    if readable and text.isascii() and all(len(ln) <= MIME_LINE_MAX for ln in text.split("\n")):
        part = MIMEText(text, subtype, "us-ascii")
    else:
        part = MIMEText(text, subtype, "utf-8")
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def seed_files(instance_id: str, hostname: Optional[str], user: Optional[str], ssh_keys: Sequence[str],
               user_data: Optional[bytes], network_config: Optional[bytes]) -> Dict[str, bytes]:
    """The NoCloud seed's files: {"meta-data", "user-data"[, "network-config"]} -> their bytes.

    Every input is checked again here (cheap: they are bounded), so no
    unchecked value reaches a file. `ssh_keys` are lines as check_ssh_keys
    returned them; `user_data` may be gzip'd.
    """
    if not isinstance(instance_id, str) or not INSTANCE_ID_RE.match(instance_id):
        raise ProvisionError("instance-id %s is not [A-Za-z0-9][A-Za-z0-9._-]{0,127}" % _show(str(instance_id)))
    if hostname is not None:
        check_hostname(hostname)
    if user is not None:
        check_user(user)
    keys = check_ssh_keys("\n".join(ssh_keys)) if ssh_keys else []

    meta = ["instance-id: %s" % _yaml_str(instance_id)]
    if hostname is not None:
        meta.append("local-hostname: %s" % _yaml_str(hostname))
    files = {"meta-data": ("\n".join(meta) + "\n").encode()}

    ours = _cloud_config(hostname, user, keys).encode()
    if user_data is None:
        files["user-data"] = ours
    else:
        theirs = check_user_data(user_data)
        if user is None and not keys:
            files["user-data"] = theirs  # the host name is in meta-data: nothing of ours to add
        else:
            kind = _user_data_kind(theirs.decode("utf-8"))
            outer = MIMEMultipart("mixed")
            outer.attach(_mime_text(ours, "cloud-config", "tenbox.cfg", readable=True))
            if kind == "multipart":
                outer.attach(email.message_from_bytes(theirs))  # cloud-init walks nested multiparts
            else:
                outer.attach(_mime_text(theirs, _MIME_SUBTYPE[kind], "user-data"))
            files["user-data"] = outer.as_bytes()
    if network_config is not None:
        files["network-config"] = check_network_config(network_config)
    return files


# -- the seed disk ----------------------------------------------------------------------------


def _tool_message(stderr: bytes) -> str:
    """The line of a failed xorriso's stderr that says why.

    Its last FAILURE/SORRY/FATAL line when it has one: xorriso's very last
    line is then the generic "aborting : -abort_on 'FAILURE' encountered".
    """
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return "no message"
    for ln in reversed(lines):
        if any(w in ln for w in (": FAILURE :", ": SORRY :", ": FATAL :")):
            return ln[:300]
    return lines[-1][:300]


def _check_files(files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        if name not in SEED_NAMES:
            raise ValueError("%r is not a NoCloud seed file (%s)" % (name, ", ".join(SEED_NAMES)))
        if not isinstance(data, bytes):
            raise ValueError("seed file %s is not bytes" % name)
    for name in SEED_REQUIRED:
        if name not in files:
            raise ValueError("a NoCloud seed needs %s" % name)
    total = sum(len(d) for d in files.values())
    if total > SEED_BYTES_MAX:
        raise ValueError("seed files are %d bytes: at most %d" % (total, SEED_BYTES_MAX))


def build_seed(folder: Union[str, "os.PathLike[str]"], files: Mapping[str, bytes]) -> Path:
    """Write `folder`/seed.iso, the `cidata` ISO 9660 (Joliet, Rock Ridge) disk holding `files`, and return its path.

    Atomic: the files and the image are made in a hidden folder inside
    `folder`, the image is fsync'd and renamed over seed.iso, then the
    folder is fsync'd. Any failure leaves `folder` as it was (a crash can
    leave a `.seed-*` folder behind). Blocks for the tool's run (~0.1 s,
    at most SEED_TOOL_TIMEOUT_SEC): call it off the event loop.
    """
    _check_files(files)
    tool = shutil.which(SEED_TOOL)
    if tool is None:
        raise SeedBuildError("%s not found: install Debian's %s package to make cloud-init seed disks"
                             % (SEED_TOOL, SEED_TOOL_PACKAGE))
    folder = Path(folder)
    target = folder / SEED_ISO
    stage = Path(tempfile.mkdtemp(prefix=".seed-", dir=str(folder)))
    try:
        tree = stage / "cidata"
        tree.mkdir()
        for name, data in files.items():
            (tree / name).write_bytes(data)
        image = stage / SEED_ISO
        # -no_rc: no startup files (/etc/xorriso/..., ~/.xorrisorc); -r: Rock Ridge with root-owned,
        # world-readable files whatever the staging files' owner and modes; -J: Joliet.
        argv = [tool, "-no_rc", "-as", "mkisofs", "-volid", SEED_VOLUME_ID, "-J", "-r",
                "-o", str(image), str(tree)]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=dict(SEED_TOOL_ENV), cwd=str(stage), timeout=SEED_TOOL_TIMEOUT_SEC,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise SeedBuildError("%s did not finish making the seed disk within %g s"
                                 % (SEED_TOOL, SEED_TOOL_TIMEOUT_SEC)) from None
        except OSError as e:
            raise SeedBuildError("cannot run %s: %s" % (tool, e.strerror)) from None
        if done.returncode != 0:
            raise SeedBuildError("%s failed making the seed disk (exit %d): %s"
                                 % (SEED_TOOL, done.returncode, _tool_message(done.stderr)))
        try:
            fd = os.open(str(image), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise SeedBuildError("%s exited 0 but wrote no seed disk" % SEED_TOOL) from None
        try:
            if os.fstat(fd).st_size == 0:
                raise SeedBuildError("%s exited 0 but wrote an empty seed disk" % SEED_TOOL)
            os.fchmod(fd, PRIVATE_FILE_MODE)  # user-data can hold secrets: root's only, like vm.json
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(str(image), str(target))
        fsync_dir(str(folder))
    finally:
        try:
            shutil.rmtree(str(stage))
        except OSError as e:
            # The seed is in place, or the error that got us here is on its way up: a staging
            # folder that cannot be removed is worth a log line, not a failed request.
            log.warning("cannot remove %s, left from making a seed disk: %s", stage, e)
    return target


# -- a VM's seed ------------------------------------------------------------------------------

SEED_SERIAL = "cidata"  # the seed disk's virtio-blk serial (/dev/disk/by-id/virtio-cidata in the guest)


def seed_for(folder: Union[str, "os.PathLike[str]"], stored: Mapping[str, Optional[str]]) -> Path:
    """Build `folder`/seed.iso from a VM's stored cloud_init (spec.py CLOUD_INIT_STORED); blocks (xorriso)."""
    user_data = stored.get("user_data_b64")
    network_config = stored.get("network_config")
    files = seed_files(stored.get("instance_id") or "", stored.get("hostname"), stored.get("user"),
                       (stored.get("ssh_keys") or "").splitlines(),
                       base64.b64decode(user_data) if user_data else None,
                       network_config.encode("utf-8", "surrogateescape") if network_config else None)
    return build_seed(folder, files)


def seed_entry(path: Union[str, "os.PathLike[str]"]) -> Dict[str, object]:
    """The VM spec's disk entry for its seed: read-only raw, tenboxd's own, marked as the seed."""
    return {"path": str(path), "read_only": True, "serial": SEED_SERIAL, "owned": True, "format": "raw",
            SEED_KEY: True}


def key_fingerprint(line: str) -> Optional[str]:
    """An OpenSSH public key line's fingerprint as `ssh-keygen -l` shows it (SHA256:...), or None."""
    words = line.split()
    if len(words) < 2:
        return None
    try:
        blob = base64.b64decode(words[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
