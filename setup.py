"""Build the compiled hot path (l4lb._native) from ext/.

L4LB_DEBUG=1 builds with annotate output, line tracing and the expensive asserts that
ext/l4lb/*.pxi guard with `if L4LB_DEBUG:` (a C macro, so release builds drop them).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("L4LB_DEBUG") == "1"

extensions = [
    Extension(
        "l4lb._native",
        ["ext/l4lb/_native.pyx"],
        extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
        define_macros=[("L4LB_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        annotate=DEBUG,
        compiler_directives={
            "language_level": 3,
            "boundscheck": DEBUG,
            "wraparound": False,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "linetrace": DEBUG,
            "embedsignature": True,
        },
    ),
)
