"""Builds muser's optional C accelerator, `muser._speedups` (the hot path's plain
loop); everything else about the package is in pyproject.toml. An extension that
cannot be built (no compiler, no Python headers) is skipped with a warning and
the install goes on: muser then runs the same loop in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("muser._speedups", ["muser/_speedups.c"], optional=True)])
