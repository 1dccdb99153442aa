"""Benchmarks that regenerate docs/benchmarks/*.md and their index docs/benchmarks.md (not run
by the tests).

One form: ``python -m benchmarks PAGE [--quick] [--seeds N] [--out DIR]`` (``python -m
benchmarks --help`` lists the pages). ``harness`` holds what pages share, ``pages/`` one spec
per page, ``peers`` the non-netshrink methods compared against. Only public ``netshrink`` names.
"""
