"""CLI subcommands of this package (added to `vlforge` by vlforge.cli; keep imports light)."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `vlforge` parser."""
