"""Consent model, decision engine and patient web form."""
