"""Inside the arm64 lane: a host without python3-libfdt (tests; in the arm64 lane, root).

    python3 -m tests.framework.arm64_nofdt --kernel K --initrd I

Python's own way to make a module absent (`sys.modules[name] = None`:
every `import libfdt` then raises ImportError), for the worker and for
`doctor`, in one process each. Prints `NOFDT:` lines for the outer test.
"""

import runpy
import sys

from tenbox_supervisor.doctor import run_checks


def main() -> int:
    sys.modules["libfdt"] = None  # type: ignore[assignment]
    check = [c for c in run_checks()["checks"] if c["id"] == "arm_fdt"][0]
    print("NOFDT: doctor %s %s" % (check["ok"], check["message"]), flush=True)
    sys.argv = ["tenbox-vm-runtime"] + sys.argv[1:] + ["--console", "stdio"]
    try:
        runpy.run_module("tenbox_vmm", run_name="__main__")
    except SystemExit as e:
        print("NOFDT: exit %s" % e.code, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
