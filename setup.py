"""Builds the native fast path; everything else is in pyproject.toml."""

from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

# _fastpath.pyx is one extension module compiled as one C file: it `include`s the parts under
# flannel_udp/fastpath/ (*.pxi) and its C helpers (*.h) from there.
PARTS = sorted(glob("flannel_udp/fastpath/*.pxi") + glob("flannel_udp/fastpath/*.h"))

setup(
    ext_modules=cythonize(
        [
            Extension(
                "flannel_udp._fastpath",
                ["flannel_udp/_fastpath.pyx"],
                include_dirs=["flannel_udp"],
                depends=PARTS,
                extra_compile_args=["-O2", "-Wno-unused-function"],
                libraries=["pthread"],
            )
        ],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
