"""Builds pipeproxy with its protocol core (``pipeproxy/core``) compiled by mypyc.

The core is plain, fully typed Python; compiled, it costs about half the CPU a message
(``benchmarks/README.md``), which is most of what one pipeproxy process can carry. The
compiled modules are the same code: where they cannot be built, pipeproxy installs as
pure Python and works the same, only slower. That happens

- with ``PIPEPROXY_PURE_PYTHON=1`` in the environment;
- for an editable install (``pip install -e .``): the sources stay what runs, so an edit
  takes effect without a rebuild (the test suite runs them; ``tests/test_compiled.py``
  builds the compiled core and runs the core's tests against it);
- where the build fails (no C compiler, say): a warning says so, and the install goes on.

Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Every module of the core but the settings: config.py and values.py are read at start-up,
# not per event, and a Config goes to each worker process pickled, which a compiled
# frozen dataclass refuses (its unpickling sets attributes one by one).
CORE = sorted(
    str(path)
    for path in Path("pipeproxy/core").glob("*.py")
    if path.name not in ("__init__.py", "config.py", "values.py")
)


class OptionalBuildExt(build_ext):
    """Compiles the core if it can; if not, says why and leaves the pure Python."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # setuptools raises its own and distutils' error types
            # All or nothing: the compiled modules share one library, and a module
            # compiled beside one that is not would still load.
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            self.warn(f"the compiled core could not be built, pipeproxy runs as pure Python: {error}")


def compiled_core() -> list:
    if os.environ.get("PIPEPROXY_PURE_PYTHON") or "editable_wheel" in sys.argv:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    # The project's mypy settings are for checking all of it; compiling the core needs
    # none of them (and warn_unused_configs would fail on the sections it does not use).
    return mypycify(["--config-file", "", *CORE], group_name="pipeproxy_core")


setup(ext_modules=compiled_core(), cmdclass={"build_ext": OptionalBuildExt})
