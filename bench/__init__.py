"""tenbox's benchmarks, run from the repository root as `python3 -m bench.NAME` (bench; root for /dev/kvm).

Each runs tenbox and a reference (QEMU with KVM, or QEMU's own devices)
side by side in one run and prints ratios; `make bench` runs them all and
docs/performance.md keeps the latest figures. The child processes, the
guests and the QEMU command lines come from tests/framework, which the
tests use too.
"""
