"""Build hook: emit the pre-parsed cffi modules next to the built packages.

cffi's out-of-line ABI mode writes plain Python files (no C compiler, no
compiled code), so the package stays architecture independent while the
worker skips pycparser at start-up. See tenbox_vmm/ffigen.py.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class BuildPyWithFfi(build_py):
    def run(self):
        super().run()
        from tenbox_vmm import ffigen

        for path in ffigen.emit_all(self.build_lib):
            self.announce("pre-parsed cffi module %s" % path, level=2)


setup(cmdclass={"build_py": BuildPyWithFfi})
