"""Metrics and measurements; built on common/ and data/ (the demos' judge reads the synthetic set), never on a
script except bench.py, which measures them."""
