"""Passerelle test suite."""
