"""Kept for the optional compiled extension in csrc/ (later work).

Today csrc/ holds no sources: this installs the pure-Python package, and never fails on a
CPU-only machine. The extension, once it exists, builds only when LORA_KERNELS_BUILD_EXT=1; the
switch is an explicit environment variable, never a probe of the hardware.
"""

import os
from pathlib import Path

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(str(p) for p in Path("csrc").glob("*.cpp")) if Path("csrc").is_dir() else []
if os.environ.get("LORA_KERNELS_BUILD_EXT", "0") == "1" and sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("lora_kernels._C", sources)]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
