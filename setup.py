"""Package build. The C++/CUDA extension is not built here unless asked for (BNFUSED_BUILD_EXT=1):
by default it is compiled on first use by bnfused.backends.native, so installing needs no compiler."""

from setuptools import setup

setup()
