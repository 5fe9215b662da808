"""albef plugin (being written)."""
