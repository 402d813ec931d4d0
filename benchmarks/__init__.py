"""Passerelle benchmarks: `python -m benchmarks [--scale small|full] [--db sqlite|postgresql] [--only SECTION]`.

Every figure comes from the product's real code paths (the app factory, the CLI, gunicorn
with the shipped configuration) on seeded synthetic data; each section prints its own
tables with the target beside the measurement. See benchmarks/README.md.
"""
