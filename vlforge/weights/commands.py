"""`vlforge export RUN|CHECKPOINT --format F -o DIR` (this module stays light: no torch import)."""

from __future__ import annotations

import argparse

FORMATS = ("hf-clip", "open_clip", "safetensors")


def cmd_export(args: argparse.Namespace) -> int:
    from vlforge.weights.export import export

    files = export(args.source, args.format, args.output)
    print(f"vlforge: exported {args.source} as {args.format} to {args.output}: {len(files)} files")
    for path in files:
        print(f"  {path.name}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="write a trained model as a Hugging Face CLIP folder, an open_clip folder or safetensors",
    )
    export.add_argument("source", metavar="RUN|CHECKPOINT", help="run directory or checkpoint")
    export.add_argument("--format", required=True, choices=FORMATS, help="what to write (docs/weights.md)")
    export.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write (created)")
    export.set_defaults(func=cmd_export)
