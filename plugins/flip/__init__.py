"""flip plugin (being written)."""
