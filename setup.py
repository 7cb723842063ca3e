"""Build the Cython core. SHMIPC_DEBUG=1 builds with assertions and no optimisation."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SHMIPC_DEBUG") == "1"

extension = Extension(
    "shmipc._ring",
    ["shmipc/_ring.pyx"],
    include_dirs=["shmipc"],
    define_macros=[("SHMIPC_DEBUG", "1" if DEBUG else "0")],
    extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2"],
)

setup(
    ext_modules=cythonize(
        [extension],
        include_path=["."],
        compiler_directives={
            "language_level": 3,
            "boundscheck": DEBUG,
            "wraparound": False,
            "initializedcheck": DEBUG,
        },
    ),
)
