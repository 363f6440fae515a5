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
