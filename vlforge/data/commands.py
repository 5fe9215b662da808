"""CLI subcommands of this package (added to `vlforge` by vlforge.cli; keep imports light).

vlforge data pack SRC DEST      shards from a folder of images + .txt captions, or a caption file
vlforge data inspect URL        sample counts per shard and a few samples (exit 1 if a shard is broken)
"""

from __future__ import annotations

import argparse
import sys


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `vlforge` parser."""
    data = subparsers.add_parser("data", help="pack and inspect datasets (WebDataset shards)")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    pack = commands.add_parser("pack", help="write WebDataset shards (+ sizes.json) from images and captions")
    pack.add_argument(
        "src", help="folder of images with same-named .txt captions, or a JSON/JSONL caption file"
    )
    pack.add_argument("dest", help="folder or fsspec URL for the shards")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    pack.add_argument("--image-root", default="", help="caption file: folder its image paths are relative to")
    pack.add_argument(
        "--seed", type=int, default=0, help="seed of the shuffle (default 0; kept in pack.json)"
    )
    pack.add_argument("--no-shuffle", action="store_true", help="keep the sorted order of SRC in the shards")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar")
    pack.set_defaults(func=cmd_pack)

    inspect = commands.add_parser("inspect", help="count samples per shard and show a few")
    inspect.add_argument("url", help="shard URL(s), brace patterns allowed: 'data/{00000..00009}.tar'")
    inspect.add_argument("--samples", type=int, default=3, help="samples to show (default 3)")
    inspect.add_argument("--max-shards", type=int, help="read only the first N shards")
    inspect.set_defaults(func=cmd_inspect)


def cmd_pack(args: argparse.Namespace) -> int:
    from vlforge.data.pack import pack

    if args.shard_size < 1:
        from vlforge.errors import UserError

        raise UserError("--shard-size must be at least 1")
    report = pack(
        args.src,
        args.dest,
        shard_size=args.shard_size,
        image_root=args.image_root,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        progress=not args.no_progress,
    )
    last = len(report.shards) - 1
    order = "sorted order" if args.no_shuffle else f"shuffled, seed {args.seed}"
    print(f"vlforge: {report.samples} samples in {len(report.shards)} shards under {args.dest} ({order})")
    if report.skipped:
        print("vlforge: left out " + ", ".join(f"{n} {kind}" for kind, n in sorted(report.skipped.items())))
    print(f'vlforge: urls = "{args.dest.rstrip("/")}/{{00000..{last:05d}}}.tar"')
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vlforge.data.pack import describe_sample, inspect_shards

    summaries, examples = inspect_shards(args.url, show=args.samples, max_shards=args.max_shards)
    if not summaries:
        from vlforge.errors import UserError

        raise UserError(f"{args.url} names no shard")
    for summary in summaries:
        fields = ", ".join(f"{name} {count}" for name, count in sorted(summary.fields.items()))
        problem = f"  BROKEN ({summary.error})" if summary.error else ""
        print(f"{summary.url}: {summary.samples} samples [{fields}]{problem}")
    broken = sum(summary.error is not None for summary in summaries)
    total = sum(summary.samples for summary in summaries)
    print(f"total: {total} samples in {len(summaries)} shards ({broken} broken)")
    for sample in examples:
        print(describe_sample(sample))
    if broken:
        print(f"vlforge: {broken} of {len(summaries)} shards are BROKEN", file=sys.stderr)
    return 1 if broken else 0
