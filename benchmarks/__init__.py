"""Benchmarks that regenerate docs/benchmarks.md (not run by the unit tests).

``python -m benchmarks [--quick] [--models lenet5,vgg_small]`` runs every method on each
reference model in a fresh subprocess (so peak memory is per method) and writes the page and
its Pareto plots.
"""
