"""Who may import whom (docs/architecture.md): each package reaches the others only through their protocol modules."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package -> the modules of the other packages it may import (a module's own submodules included)
ALLOWED = {
    "tenbox_vmm": (),
    "tenbox_supervisor": ("tenbox_vmm.protocol",),
    "tenbox_ctl": ("tenbox_supervisor.protocol", "tenbox_vmm.protocol"),
}


def imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def may_import(package: str, module: str) -> bool:
    top = module.split(".")[0]
    if top == package or top not in ALLOWED:
        return True
    return any(module == m or module.startswith(m + ".") for m in ALLOWED[package])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_reach_each_other_only_through_protocol_modules(package):
    wrong = ["%s:%d imports %s" % (path.relative_to(REPO), line, module)
             for path in sorted((REPO / package).rglob("*.py"))
             for line, module in imports(path) if not may_import(package, module)]
    assert wrong == []


# Modules a worker's start must not import (docs/performance.md, Boot): each costs every cold start
# milliseconds. dataclasses pulls in inspect (about 4 ms) and makes each class with an exec;
# ctypes.util runs `ldconfig -p` as a child process when asked for a library.
WORKER_START = ("tenbox_vmm.__main__", "tenbox_vmm.machine", "tenbox_vmm.sandbox", "tenbox_vmm.supervisor_link",
                "tenbox_vmm.console", "tenbox_vmm.usernet", "tenbox_vmm.protocol.link")
NOT_AT_WORKER_START = ("dataclasses", "inspect", "ctypes.util", "platform", "subprocess")


def test_a_worker_start_imports_none_of_the_costly_modules():
    import subprocess
    import sys

    code = ("import sys\nfor m in %r: __import__(m)\nprint(' '.join(m for m in %r if m in sys.modules))"
            % (WORKER_START, NOT_AT_WORKER_START))
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []


# What a bare boot (no link, no network, no terminal) imports before its guest runs must not pull
# these in either: each cost a boot 0.5-2 ms (docs/performance.md, Boot), and only the link, the NIC,
# the standby, a terminal console or the image tools need them.
BARE_BOOT = ("tenbox_vmm.__main__", "tenbox_vmm.machine", "tenbox_vmm.sandbox", "tenbox_vmm.console",
             "tenbox_vmm.logfiles", "tenbox_vmm.passed_files")
NOT_AT_BARE_BOOT = ("shutil", "socket", "termios", "tty", "tenbox_vmm.protocol.link")


def test_a_bare_boot_and_its_command_line_import_none_of_the_modules_only_other_paths_need():
    import subprocess
    import sys

    code = ("import sys\nfor m in %r: __import__(m)\nsys.modules['tenbox_vmm.__main__'].build_parser()"
            ".parse_args(['--kernel', 'k'])\nprint(' '.join(m for m in %r if m in sys.modules))"
            % (BARE_BOOT, NOT_AT_BARE_BOOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []


def test_the_runtime_help_wraps_at_the_terminal_width_it_is_told():
    import os
    import subprocess
    import sys

    def help_lines(columns: str):
        r = subprocess.run([sys.executable, "-m", "tenbox_vmm", "--help"], cwd=str(REPO), capture_output=True,
                           text=True, timeout=60, env=dict(os.environ, COLUMNS=columns))
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    narrow, wide = help_lines("50"), help_lines("200")
    # argparse does not break a usage token such as [--console {auto,tty,stdio,none}]
    assert [line for line in narrow if len(line) > 50 and not line.strip().startswith("[")] == []
    assert max(len(line) for line in wide) > 100 and len(wide) < len(narrow)
