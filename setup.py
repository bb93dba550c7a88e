"""Builds the C++ extension lora_kernels._C (csrc/: the ops' schemas, CPU kernels and CPU autograd).

LORA_KERNELS_BUILD_EXT:
  unset  build it when torch is importable here (pip install --no-build-isolation, so that it builds against
         the installed torch) and a C++ compiler runs; otherwise, or if the build fails, install the pure-Python
         package with a warning (lora_kernels.extension_status() says which is in use and why)
  1      build it or fail, with warnings as errors (CI)
  0      do not build it
"""

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

MODE = os.environ.get("LORA_KERNELS_BUILD_EXT", "").strip()
SOURCES = sorted(str(p) for p in Path("csrc").glob("*.cpp"))


def _why_not_built() -> str | None:
    if MODE == "0":
        return "LORA_KERNELS_BUILD_EXT=0"
    if not SOURCES:
        return "no csrc/*.cpp"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not importable at build time (install with pip --no-build-isolation)"
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if shutil.which(compiler.split()[0]) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    return None


def _extension_build():
    """(ext_modules, cmdclass) for the C++ extension, or ([], {}) when it is not built."""
    reason = _why_not_built()
    if reason is not None:
        if MODE == "1":
            sys.exit(f"LORA_KERNELS_BUILD_EXT=1 but the C++ extension cannot be built: {reason}")
        print(f"lora-kernels: C++ extension not built ({reason}); the pure-Python ops are used", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

    # torch's headers as system headers: -Wall -Wextra -Werror hold our code to it, not theirs
    flags = ["-O3", "-std=c++20", "-Wall", "-Wextra"] + [f"-isystem{path}" for path in include_paths()]
    flags += ["-Werror"] if MODE == "1" else []

    class BuildOrWarn(BuildExtension):
        """Unless LORA_KERNELS_BUILD_EXT=1, a failed build leaves the pure-Python package, with a warning."""

        def run(self):
            try:
                super().run()
            except Exception as error:   # compiler errors, a torch without headers, ...
                if MODE == "1":
                    raise
                if self.inplace:   # never leave an older build to be loaded beside newer Python
                    for output in self.get_outputs():
                        Path(output).unlink(missing_ok=True)
                print(f"lora-kernels: C++ extension build failed ({error}); the pure-Python ops are used",
                      file=sys.stderr)

    import torch.version

    # depends: an in-place build (build_ext --inplace) is redone only when one of these or a source is newer
    # than the built module (a reinstalled torch rewrites torch/version.py)
    extension = CppExtension("lora_kernels._C", SOURCES, include_dirs=[str(Path("csrc").resolve())],
                             depends=[*map(str, Path("csrc").glob("*.h")), torch.version.__file__],
                             extra_compile_args={"cxx": flags})
    return [extension], {"build_ext": BuildOrWarn}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
