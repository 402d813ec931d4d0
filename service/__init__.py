"""Passerelle service: HTTP API, storage, auth, audit and CLI."""
