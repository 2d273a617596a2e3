"""Benchmarks: ``python benchmarks/overhead.py`` (``make bench``) measures success-path cost."""
