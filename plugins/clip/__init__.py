"""CLIP baseline (placeholder, filled in by the clip plugin work)."""
