"""De-identification profiles, keys, differential privacy and budgets."""
