"""Readers (filled in by the io work)."""

__all__: list[str] = []
