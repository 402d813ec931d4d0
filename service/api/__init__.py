"""HTTP surfaces: one blueprint per audience."""
