"""`vlforge checkpoint inspect | consolidate`: look into and flatten a run's checkpoints (light imports)."""

from __future__ import annotations

import argparse

from vlforge.results.commands import runs_root_option


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    checkpoint = subparsers.add_parser("checkpoint", help="inspect or consolidate checkpoints")
    commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)

    inspect = commands.add_parser("inspect", help="step, world size, size and parts of checkpoints")
    inspect.add_argument("source", help="a run id, a run directory or a checkpoint")
    inspect.add_argument("--verify", action="store_true", help="also check every file's sha256")
    runs_root_option(inspect)
    inspect.set_defaults(func=cmd_inspect)

    consolidate = commands.add_parser("consolidate", help="write a sharded checkpoint as one torch.save file")
    consolidate.add_argument("source", help="a run id, a run directory (its latest) or a checkpoint")
    consolidate.add_argument("-o", "--output", required=True, help="the file to write (any fsspec URL)")
    runs_root_option(consolidate)
    consolidate.set_defaults(func=cmd_consolidate)


def checkpoints_of(source: str, runs_root: str | None) -> list[str]:
    """The checkpoint ``source`` names, or every checkpoint of the run it names (oldest first)."""
    import fsspec

    from vlforge.checkpoint.layout import list_checkpoints, step_of
    from vlforge.errors import UserError
    from vlforge.results.rundir import resolve_root, to_url

    fs, path = fsspec.core.url_to_fs(source)
    if fs.exists(path):
        try:
            step_of(source)
            return [source.rstrip("/")]
        except ValueError:
            found = [url for _, url in list_checkpoints(source)]
    else:
        root_fs, root = fsspec.core.url_to_fs(resolve_root(runs_root))
        runs = root_fs.glob(f"{root}/*/{source}")
        if not runs:
            raise UserError(f"no checkpoint, run directory or run id '{source}' (runs root {root})")
        found = [url for _, url in list_checkpoints(to_url(root_fs, runs[0]))]
    if not found:
        raise UserError(f"no checkpoint in {source}")
    return found


def describe(url: str, checksums: bool) -> tuple[list[str], str | None]:
    """The lines ``inspect`` prints for ``url``, and what is wrong with it (None: intact)."""
    from vlforge.checkpoint.layout import is_legacy, read_manifest, step_of, verify

    problem = verify(url, checksums=checksums)
    status = f"DAMAGED: {problem}" if problem else ("intact (sha256 checked)" if checksums else "complete")
    if is_legacy(url):
        import fsspec

        size = fsspec.core.url_to_fs(url)[0].size(url)
        return [
            f"{url}",
            f"  step {step_of(url)}, single-file format (before DCP), {size:,} bytes",
            f"  {status}",
        ], problem
    manifest = read_manifest(url)
    lines = [
        url,
        f"  step {manifest['step']}, saved at world size {manifest['world_size']}, "
        f"{manifest['bytes']:,} bytes in {len(manifest['parts'])} parts",
        f"  {status}",
    ]
    if manifest.get("excluded"):
        lines.append(f"  {len(manifest['excluded'])} frozen tensors left out (reloaded from the recipe)")
    lines += [f"    {name:<24} {part['size']:>14,}" for name, part in sorted(manifest["parts"].items())]
    return lines, problem


def cmd_inspect(args: argparse.Namespace) -> int:
    damaged = False
    for url in checkpoints_of(args.source, args.runs_root):  # each verified once (hashing is slow)
        lines, problem = describe(url, args.verify)
        print("\n".join(lines))
        damaged = damaged or problem is not None
    return 1 if damaged else 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from vlforge.checkpoint import store
    from vlforge.checkpoint.layout import is_legacy, verify
    from vlforge.errors import UserError

    url = checkpoints_of(args.source, args.runs_root)[-1]
    if is_legacy(url):
        raise UserError(f"{url} is already a single file")
    problem = verify(url)
    if problem:
        raise UserError(f"{url} is damaged ({problem}); consolidate an intact one")
    size = store.consolidate(url, args.output)
    print(f"{url} -> {args.output} ({size:,} bytes)")
    return 0
