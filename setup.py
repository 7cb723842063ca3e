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
    # a release .so without debug sections (1.7 MB -> ~0.3 MB); the symbol
    # table stays, so a crash's backtrace still names functions
    extra_link_args=[] if DEBUG else ["-Wl,--strip-debug"],
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
