"""Data sets and their loaders; built on common/ only."""
