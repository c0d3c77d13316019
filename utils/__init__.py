"""Shared building blocks of the language-ticket scripts (one concept per module)."""
