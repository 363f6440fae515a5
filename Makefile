# tenbox: developer entry points. Everything runs from the source tree with
# Debian's python3 and the distribution's python3-* packages, exactly the
# interpreter and libraries the .deb uses.

PYTHON ?= /usr/bin/python3
export PYTHONPATH := $(CURDIR)
PYTEST ?= $(PYTHON) -m pytest

.PHONY: all deps ffi guests linux test test-unit test-integration demo bench clean

all: ffi guests

deps:
	scripts/install-deps.sh

# Pre-parsed cffi modules (see tenbox_vmm/ffigen.py); optional, faster start-up.
ffi:
	$(PYTHON) -m tenbox_vmm.ffigen .

guests:
	$(MAKE) -s -C tests/guests

# Debian's cloud kernel and a busybox initramfs, cached under .cache/linux.
linux:
	scripts/x86_64/get-kernel.sh
	scripts/x86_64/make-initramfs.sh

# Everything, the packaging matrix (Debian 11/12/13 chroots, ~6 min) included.
test: deps ffi guests linux
	TENBOX_PACKAGING_TESTS=1 $(PYTEST) -q -ra tests

test-unit: ffi
	$(PYTEST) -q tests/unit

demo: deps ffi guests
	scripts/demo.sh

# Benchmarks are modules of the bench package (they import tests/framework).
bench: deps ffi guests linux
	$(PYTHON) -m bench.boot
	$(PYTHON) -m bench.control
	$(PYTHON) -m bench.blk
	$(PYTHON) -m bench.net
	$(PYTHON) -m bench.disk_host
	$(PYTHON) -m bench.blk --linux
	$(PYTHON) -m bench.net --linux

clean:
	rm -rf build dist *.egg-info tests/guests/out tenbox_vmm/kvm/_kvm_ffi.py tenbox_vmm/net/_slirp_ffi.py tenbox_vmm/disk/_fallocate_ffi.py
	find . -name __pycache__ -prune -exec rm -rf {} +

# Packaging (docs/packaging.md): `make deb` builds dist/tenbox_<version>_all.deb
# in a copy of the tree; `make test-distros` builds it, runs lintian and
# installs, upgrades and purges it in Debian 11/12/13 chroots (root).
.PHONY: deb test-distros
deb:
	$(PYTHON) -m tests.packaging.deps --build-only
	$(PYTHON) -m tests.packaging.build --out dist

test-distros:
	$(PYTEST) -q -ra tests/packaging
