"""Benchmarks: `make bench` (python -m bench [NAME ...]). Each prints ratios against a
reference measured in the same run; targets are printed beside the figures."""
