"""Builds the native fast path; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension(
                "flannel_udp._fastpath",
                ["flannel_udp/_fastpath.pyx"],
                extra_compile_args=["-O2", "-Wno-unused-function"],
                libraries=["pthread"],
            )
        ],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
