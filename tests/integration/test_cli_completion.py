"""Shell completion for real: click's bash script, loaded in bash, completes commands and a VM name from a running tenboxd."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.framework.daemon import ok
from tests.framework.repo import PYTHON, REPO, repo_env

LAUNCHER = (REPO / "debian" / "launcher.in").read_text().replace("@MODULE@", "tenbox_ctl").replace(
    "#!/usr/bin/python3 -s", "#!" + PYTHON)


@pytest.fixture
def bindir(tmp_path):
    """`tenbox` and `tenboxctl` as the package installs them (debian/launcher.in), on a PATH of their own."""
    d = tmp_path / "bin"
    d.mkdir()
    for prog in ("tenbox", "tenboxctl"):
        (d / prog).write_text(LAUNCHER)
        (d / prog).chmod(0o755)
    return d


def complete(bindir: Path, socket: str, shell_words: str, prog: str = "tenbox") -> list:
    """COMPREPLY after sourcing the generated script and pressing TAB after `shell_words`."""
    script = subprocess.run([PYTHON, "-m", "tenbox_ctl.complete", "bash", prog], capture_output=True, text=True,
                            env=repo_env(), check=True).stdout
    words = shell_words.split(" ")
    program = "\n".join([
        script,
        "COMP_WORDS=(%s)" % " ".join("'%s'" % w for w in words),
        "COMP_CWORD=%d" % (len(words) - 1),
        "_%s_completion %s" % (prog, prog),
        'printf "%s\\n" "${COMPREPLY[@]}"',
    ])
    env = repo_env({"TENBOX_SOCK": socket, "PATH": "%s:/usr/bin:/bin" % bindir})
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return [w for w in r.stdout.split("\n") if w]


def test_the_bash_script_loads_and_completes_commands_and_vm_names(daemon, bindir):
    ok(daemon.ctl("vm", "create", "webserver", "--kernel", "/bin/true", "--memory", "16"))
    ok(daemon.ctl("vm", "create", "worker2", "--kernel", "/bin/true", "--memory", "16"))
    sock = str(daemon.socket)
    assert complete(bindir, sock, "tenbox vm st") == ["start", "stats", "stop"]
    assert complete(bindir, sock, "tenbox vm start we") == ["webserver"]
    assert complete(bindir, sock, "tenbox vm show ") == ["webserver", "worker2"]
    assert complete(bindir, sock, "tenbox vm disk resize w") == ["webserver", "worker2"]
    assert complete(bindir, sock, "tenboxctl vm stop web", prog="tenboxctl") == ["webserver"]


def test_without_a_daemon_names_do_not_complete_and_nothing_is_printed(bindir, tmp_path):
    assert complete(bindir, str(tmp_path / "none.sock"), "tenbox vm start we") == []
    assert complete(bindir, str(tmp_path / "none.sock"), "tenbox ev") == ["events"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_the_zsh_script_loads_in_zsh():
    script = subprocess.run([PYTHON, "-m", "tenbox_ctl.complete", "zsh", "tenbox"], capture_output=True, text=True,
                            env=repo_env(), check=True).stdout
    r = subprocess.run(["zsh", "-f", "-c", "autoload -Uz compinit && compinit -u && eval \"$1\" && "
                        "whence -w _tenbox_completion", "zsh", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "function" in r.stdout, r.stderr
