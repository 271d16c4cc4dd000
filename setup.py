"""Builds pipeproxy with its protocol core (``pipeproxy/core``) compiled by mypyc.

The core is plain, fully typed Python; compiled, it runs at about 40 % of its cost
in-process, which takes 15 to 25 % off the CPU a message of a loaded process
(``benchmarks/README.md``). The compiled modules are the same code: where they cannot be
built, pipeproxy installs as pure Python and works the same, only slower. That happens

- with ``PIPEPROXY_PURE_PYTHON=1`` in the environment;
- for an editable install (``pip install -e .``): the sources stay what runs, so an edit
  takes effect without a rebuild (the test suite runs them; ``tests/test_compiled.py``
  builds the compiled core and runs the core's tests against it);
- where the build fails (no C compiler, say): a warning says so (``pip -v`` shows it;
  the ``starting`` log line says ``core: python``), and the install goes on.

Written for the compiler where it counts: the core's module constants are ``Final``
(compiled code reads them as C variables, not from the module's dict at each use), and
the objects made at every event have an ``__init__`` of their own (a dataclass's
generated one stays interpreted: ``wire.Reply``).

Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
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
            self.warn(f"pipeproxy's core is not compiled, it runs as pure Python: {error}")


# The commands that build what is installed. pip also runs this file for the metadata
# alone (egg_info, dist_info: nothing to compile), and for an editable install
# (editable_wheel), whose sources stay what runs.
BUILDING = {"bdist_wheel", "build", "build_ext", "install"}


def compiled_core(build: str) -> list:
    """The compiled core's extensions, their C written under ``build``; [] for pure Python."""
    if os.environ.get("PIPEPROXY_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify

        # The project's mypy settings are for checking all of it; compiling the core
        # needs none of them (warn_unused_configs would fail on the sections it skips).
        return mypycify(["--config-file", "", *CORE], group_name="pipeproxy_core", target_dir=f"{build}/mypyc")
    except (Exception, SystemExit) as error:  # mypy reports what it refuses by exiting
        print(f"warning: pipeproxy's core is not compiled, it runs as pure Python: {error}", file=sys.stderr)
        return []


extensions, options = [], {}
if BUILDING & set(sys.argv[1:]):
    # A build folder of its own, outside the sources: setuptools reuses build/, and a
    # module an earlier build compiled (from other sources) would be packed with this one's.
    build = tempfile.mkdtemp(prefix="pipeproxy-build-")
    atexit.register(shutil.rmtree, build, ignore_errors=True)
    extensions, options = compiled_core(build), {"build": {"build_base": build}}
setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt}, options=options)
