"""A signed apt repository served over HTTP on 127.0.0.1, as the seed's https://my.tenbox.ai/repo (tests; root not needed).

The layout is what apt expects from a real repository
(dists/<suite>/main/binary-{amd64,arm64}/Packages, InRelease, Release.gpg,
pool/), made by apt-ftparchive and signed with a throwaway ed25519 key, so
install-linux.sh is exercised with `signed-by=` exactly as in production.
The server is http.server's, in a thread of the test process, bound to
127.0.0.1 only; chroots share the host's network namespace and reach it.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import List

SUITE = "stable"
COMPONENT = "main"
ARCHITECTURES = ("amd64", "arm64")
GPG_TIMEOUT_SEC = 60


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        pass


class AptRepository:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.gnupg = root.parent / (root.name + "-gnupg")
        self.keyring = root.parent / (root.name + "-archive-keyring.gpg")
        self._server = None
        self._thread = None
        self.url = ""

    # Key ---------------------------------------------------------------------

    def _gpg(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["gpg", "--batch", "--quiet", "--homedir", str(self.gnupg)] + list(args),
                              check=True, timeout=GPG_TIMEOUT_SEC, capture_output=True, **kw)

    def make_key(self) -> None:
        self.gnupg.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._gpg("--passphrase", "", "--quick-gen-key", "tenbox test repository <test@tenbox.invalid>",
                  "ed25519", "sign", "never")
        self.keyring.write_bytes(self._gpg("--export").stdout)

    # Contents ----------------------------------------------------------------

    def publish(self, debs: List[Path]) -> None:
        """Make the repository hold exactly these packages, signed; apt sees them after `apt-get update`."""
        pool = self.root / "pool" / COMPONENT
        if self.root.exists():
            shutil.rmtree(self.root)
        pool.mkdir(parents=True)
        for deb in debs:
            shutil.copy2(deb, pool / deb.name)
        dist = self.root / "dists" / SUITE
        for arch in ARCHITECTURES:
            d = dist / COMPONENT / ("binary-" + arch)
            d.mkdir(parents=True)
            packages = subprocess.run(["apt-ftparchive", "--arch", arch, "packages", "pool"], cwd=self.root,
                                      check=True, capture_output=True, timeout=GPG_TIMEOUT_SEC).stdout
            (d / "Packages").write_bytes(packages)
        opts = []
        for k, v in (("Origin", "tenbox-test"), ("Label", "tenbox-test"), ("Suite", SUITE), ("Codename", SUITE),
                     ("Architectures", " ".join(ARCHITECTURES)), ("Components", COMPONENT)):
            opts += ["-o", "APT::FTPArchive::Release::%s=%s" % (k, v)]
        release = subprocess.run(["apt-ftparchive"] + opts + ["release", "."], cwd=dist, check=True,
                                 capture_output=True, timeout=GPG_TIMEOUT_SEC).stdout
        (dist / "Release").write_bytes(release)
        self._gpg("--yes", "--clearsign", "-o", str(dist / "InRelease"), str(dist / "Release"))
        self._gpg("--yes", "--armor", "--detach-sign", "-o", str(dist / "Release.gpg"), str(dist / "Release"))

    # Server ------------------------------------------------------------------

    def serve(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="apt-repo", daemon=True)
        self._thread.start()
        self.url = "http://127.0.0.1:%d" % self._server.server_address[1]
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None
        # gpg-agent started for the throwaway key
        subprocess.run(["gpgconf", "--homedir", str(self.gnupg), "--kill", "all"], capture_output=True, timeout=30)
        if os.path.isdir(self.gnupg):
            shutil.rmtree(self.gnupg, ignore_errors=True)
