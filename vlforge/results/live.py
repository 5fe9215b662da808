"""The live index: read commands bring the index up to date before they read it.

Runs write their rows into their run directories within about one log interval (the run
writer's flush); `vlforge runs | query | plot | compare` then ingest what is new (incremental,
under the one indexer lock) and read the published file. A reader waits at most
``LOCK_WAIT_S`` for another indexer and otherwise reads the index as it is, with a note:
readers never hold up a writer, and there is never more than one writer.
"""

from __future__ import annotations

import sys

import fsspec

LOCK_WAIT_S = 5.0


def refresh_index(root: str) -> None:
    """Ingest what the runs under ``root`` wrote since the last indexing (if ``root`` exists)."""
    from vlforge.results.index import IndexLockedError, build_index

    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        return  # the read itself reports the missing root
    try:
        build_index(root, lock_timeout=LOCK_WAIT_S)
    except IndexLockedError:
        _note(f"another indexer holds {root}'s index")
    except OSError as exc:  # a read-only runs root, say: reading must still work
        _note(f"could not update {root}'s index ({exc})")


def _note(problem: str) -> None:
    print(f"vlforge: note: {problem}; showing the index as last published", file=sys.stderr)
