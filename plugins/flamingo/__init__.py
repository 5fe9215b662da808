"""flamingo plugin (being written)."""
