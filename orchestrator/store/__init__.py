"""The SQLite provenance store (DESIGN.md §6)."""

from orchestrator.store.db import Store

__all__ = ["Store"]
