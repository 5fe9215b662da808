"""Resumable train streams over units of samples, split by (rank, worker).

A streaming source (``StreamingSource``) cuts its data into *units*: tar
shards, chunks of a caption file, JSONL files. The stream splits them so:

* Epoch ``e`` has an ordered unit list ``source.units(e, seed)``, the same
  on every rank (shards in a seeded shuffled order).
* There are ``readers = world_size * max(1, num_workers)`` readers; reader
  ``r = rank * workers + worker`` takes ``units[r::readers]``. In one epoch
  the readers' shares are disjoint and together hold every unit.
* A reader's position is ``(epoch, cursor, offset)``: it has finished
  ``cursor`` units of its share of ``epoch`` and taken ``offset`` samples
  (good or bad) of the next one. Each reader moves to its next epoch on its
  own when its share is done, so a stream never ends and never waits, and
  every batch is full (what ALBEF's queue needs).

Each worker builds whole batches, so every batch comes from one reader and
carries that reader's position after it. DataLoader returns batches from its
workers in strict round-robin order; the stream records the position of each
batch as the training loop *takes* it (not as workers prefetch), plus which
reader comes next. A resumed stream restarts every reader at its recorded
position and rotates the worker numbering so that the reader due next
delivers first: it yields exactly the batches the uninterrupted stream would
have. The same (world size, num_workers) is needed for that.

With another world size or worker count, the stream is given every saved
rank's state: from all readers' positions it lists the units of the epochs in
progress that no reader finished (``Leftover``: epoch, unit index, offset into
it) and deals them out to the new readers, ``leftover[r::readers]``. A reader
first reads its leftovers (position epoch ``LEFTOVER``, cursor = index into its
list), then goes on with the epoch after the last one in progress. Nothing is
repeated or skipped: positions count what the loop consumed.

Bad data is skipped and counted, never silently: a sample the source cannot
use (``BadSample``) counts as ``skipped_<kind>``, a unit that cannot be read
to its end (``BadShard``) as ``shards_<kind>``; counts travel with the
batches, so they too are counts of what the loop consumed. When the skipped
fraction passes the recipe's threshold, ``next()`` raises ``BadDataError``
and the run stops with that message.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlforge.data.tar import BadShard
from vlforge.data.urls import take_http_retries
from vlforge.errors import RunFailed
from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.data import BadDataConfig

log = logging.getLogger("vlforge.data")


class BadSample(Exception):
    """A sample the source cannot use; ``kind`` names the counter (e.g. ``missing_caption``)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind


class BadDataError(RunFailed):
    """Too much of the data was bad: the run stops rather than train on what is left."""


class Position(NamedTuple):
    epoch: int = 0
    cursor: int = 0  # units of this reader's share of the epoch already finished
    offset: int = 0  # samples of the current unit already taken, good or bad


LEFTOVER = -1  # the position's "epoch" while a reader reads units left over by another world size


class Leftover(NamedTuple):
    """A unit no reader finished before a change of world size: ``units(epoch)[index]`` from ``offset``."""

    epoch: int
    index: int
    offset: int


class Skip(NamedTuple):
    """A counted problem met while reading (a unit that broke off, an empty unit)."""

    counter: str
    detail: str


class StreamingSource:
    """Base of data sources that stream units of samples. Subclasses define:

    * ``units(epoch, seed)``: the epoch's units in order (identical on every rank);
    * ``read(unit, start)``: the unit's raw samples from index ``start`` on, in a
      fixed order; raises ``BadShard`` when the unit cannot be read on;
    * ``decode(raw, seed, epoch, counts)``: raw sample -> example, in a worker;
      raises ``BadSample`` to skip it (``counts`` takes counts of partial losses);
    * ``collate(examples)``: examples -> batch dict (a method or a callable attribute);
    * ``num_samples()``: samples in one epoch (for the epoch length).

    ``bad_data`` is the recipe's ``[data.bad_data]`` table.
    """

    bad_data: BadDataConfig
    _stream: weakref.ref[ShardedStream] | None = None  # weak: the stream refers to its source

    def units(self, epoch: int, seed: int) -> Sequence[Any]:
        raise NotImplementedError

    def read(self, unit: Any, start: int) -> Iterator[Any]:
        raise NotImplementedError

    def decode(self, raw: Any, seed: int, epoch: int, counts: Counter[str]) -> Any:
        raise NotImplementedError

    def num_samples(self) -> int:
        raise NotImplementedError

    def train_stream(
        self, micro_batch: int, seed: int, num_workers: int, rank: int, world_size: int
    ) -> ShardedStream:
        stream = ShardedStream(
            self,
            micro_batch=micro_batch,
            seed=seed,
            num_workers=num_workers,
            rank=rank,
            world_size=world_size,
        )
        self._stream = weakref.ref(stream)
        return stream

    @hookimpl
    def vlforge_log(self, metrics: dict[str, float]) -> None:
        """Adds ``data/*`` counters of this rank's stream to the logged metrics."""
        stream = self._stream() if self._stream is not None else None
        if stream is not None:
            metrics.update(stream.metrics())

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the source without the link to its stream (which holds the DataLoader).
        return {name: value for name, value in vars(self).items() if name != "_stream"}


def shuffled_blocks(
    items: Iterator[Any], block: int, seed: Sequence[int] | None, start: int
) -> Iterator[Any]:
    """``items`` permuted within consecutive blocks of ``block``, from index ``start`` of that order.

    Block ``b`` is permuted with a generator seeded by ``(*seed, b)``, so the
    order is reproducible and a resume at ``start`` re-reads only up to its
    block. ``seed=None`` or ``block <= 1`` keeps file order. A ``BadShard``
    raised by ``items`` comes after the (permuted) items read before it.
    """
    if seed is None or block <= 1:
        yield from itertools.islice(items, start, None)
        return
    first = start // block
    for _ in itertools.islice(items, first * block):  # earlier blocks: read through, not kept
        pass
    for index in itertools.count(first):
        chunk, failure = [], None
        try:
            chunk.extend(itertools.islice(items, block))
        except BadShard as exc:
            failure = exc
        order = np.random.default_rng([*seed, index]).permutation(len(chunk))
        skip = start - index * block if index == first else 0
        for position in order[skip:]:
            yield chunk[position]
        if failure is not None:
            raise failure
        if len(chunk) < block:
            return


class FileUnit(NamedTuple):
    """A shard file as a unit: its URL and the seed of its block permutation (None: file order)."""

    url: str
    shuffle_seed: tuple[int, ...] | None


def file_units(urls: list[str], seed: int, epoch: int, shuffle: bool) -> list[FileUnit]:
    """Epoch ``epoch``'s shard files: a permutation seeded by (seed, epoch), or as listed."""
    if not shuffle:
        return [FileUnit(url, None) for url in urls]
    order = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [FileUnit(urls[i], (seed, epoch, int(i))) for i in order]


SIZES_FILE = "sizes.json"  # {shard file name: samples}, written by `vlforge data pack`


def count_samples(urls: list[str], count_shard: Callable[[str], int]) -> int:
    """Samples in ``urls`` (the epoch length): from ``sizes.json`` beside the first shard, else estimated.

    Shards that ``sizes.json`` lacks (or all, without one) are estimated as the mean of
    the known sizes, or else by counting the first shard that reads to its end: a
    missing or damaged shard is passed over here, and counted when the stream meets it.
    """
    names = [url.rsplit("/", 1)[-1] for url in urls]
    sizes, sizes_url = _read_sizes(urls[0])
    known = {name: int(sizes[name]) for name in names if isinstance(sizes.get(name), int)}
    if len(known) == len(names):
        return sum(known.values())
    per_shard = sum(known.values()) / len(known) if known else _count_first_readable(urls, count_shard)
    if known:
        lacking = [name for name in names if name not in known]
        log.warning(
            "data: %s lacks %d of the %d shards (%s); estimating %.0f samples for each of them",
            sizes_url,
            len(lacking),
            len(names),
            ", ".join(lacking[:3]) + (" ..." if len(lacking) > 3 else ""),
            per_shard,
        )
    else:
        log.warning(
            "data: no usable %s beside %s; estimating %.0f samples per shard (set num_samples to be exact)",
            SIZES_FILE,
            urls[0],
            per_shard,
        )
    return max(1, round(sum(known.values()) + per_shard * (len(names) - len(known))))


def _read_sizes(first_url: str) -> tuple[dict[str, Any], str]:
    """The ``sizes.json`` beside a shard ({} when absent or not a JSON object) and its URL."""
    import json

    from vlforge.data.urls import parent_url, read_bytes

    folder = parent_url(first_url)
    url = f"{folder}/{SIZES_FILE}" if folder else SIZES_FILE
    try:
        sizes = json.loads(read_bytes(url))
    except FileNotFoundError:
        return {}, url
    except (OSError, ValueError) as exc:
        log.warning("data: cannot use %s (%s: %s)", url, type(exc).__name__, exc)
        return {}, url
    return (sizes if isinstance(sizes, dict) else {}), url


def _count_first_readable(urls: list[str], count_shard: Callable[[str], int]) -> int:
    """The sample count of the first shard that reads to its end (0 if none does)."""
    for url in urls:
        try:
            return count_shard(url)
        except BadShard as exc:
            log.warning(
                "data: cannot count %s for the epoch length (%s: %s); trying the next", url, exc.kind, exc
            )
    return 0


# --------------------------------------------------------------------------- worker side


def reader_items(
    source: StreamingSource,
    reader: int,
    readers: int,
    start: Position,
    seed: int,
    leftover: Sequence[Leftover] = (),
    resume_epoch: int = 0,
) -> Iterator[tuple[Position, Any]]:
    """Endless (position after the item, raw sample or ``Skip``) of one reader, from ``start``.

    A ``start`` in the ``LEFTOVER`` phase reads ``leftover`` first, then epoch ``resume_epoch`` on.
    """
    for position, item, _ in _items_with_epoch(source, reader, readers, start, seed, leftover, resume_epoch):
        yield position, item


def _items_with_epoch(
    source: StreamingSource,
    reader: int,
    readers: int,
    start: Position,
    seed: int,
    leftover: Sequence[Leftover],
    resume_epoch: int,
) -> Iterator[tuple[Position, Any, int]]:
    """``reader_items`` plus the epoch each item belongs to (a leftover unit's own epoch)."""
    if start.epoch == LEFTOVER:
        units: dict[int, Sequence[Any]] = {}  # each epoch's units listed once, not once per leftover
        for cursor in range(start.cursor, len(leftover)):
            item = leftover[cursor]
            offset = max(start.offset if cursor == start.cursor else 0, item.offset)
            if item.epoch not in units:
                units[item.epoch] = source.units(item.epoch, seed)
            unit = units[item.epoch][item.index]
            for position, raw in _unit_items(source, unit, LEFTOVER, cursor, offset):
                yield position, raw, item.epoch
        start = Position(resume_epoch)
    epoch, cursor, offset = start
    while True:
        share = source.units(epoch, seed)[reader::readers]
        if not share:
            raise ValueError(f"reader {reader} of {readers} has no unit to read")
        for cursor in range(cursor, len(share)):  # noqa: B020 (resumes at the saved cursor)
            for position, raw in _unit_items(source, share[cursor], epoch, cursor, offset):
                yield position, raw, epoch
            offset = 0
        epoch, cursor = epoch + 1, 0


def _unit_items(
    source: StreamingSource, unit: Any, epoch: int, cursor: int, offset: int
) -> Iterator[tuple[Position, Any]]:
    """A unit's items after ``offset``; the last item (or the failure) carries the next unit's position."""
    done = Position(epoch, cursor + 1, 0)
    seen = False
    try:
        for item, last in _with_last(source.read(unit, offset)):
            offset, seen = offset + 1, True
            yield (done if last else Position(epoch, cursor, offset)), item
    except BadShard as exc:
        log.warning("data: %s shard skipped: %s", exc.kind, exc)
        yield done, Skip(f"shards_{exc.kind}", str(exc))
        return
    if not seen:
        yield done, Skip("shards_empty", f"{unit}: no samples after offset {offset}")


def _with_last(items: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    """Each item with whether it is the last; a failure surfaces after the items before it."""
    try:
        pending = next(items)
    except StopIteration:
        return
    while True:
        try:
            following = next(items)
        except StopIteration:
            yield pending, True
            return
        except BadShard:
            yield pending, False
            raise
        yield pending, False
        pending = following


def reader_batches(
    source: StreamingSource,
    reader: int,
    readers: int,
    start: Position,
    seed: int,
    micro_batch: int,
    leftover: Sequence[Leftover] = (),
    resume_epoch: int = 0,
) -> Iterator[tuple[dict[str, Any], Position, Counter[str]]]:
    """Endless (batch, position after it, counts since the previous batch) of one reader."""
    examples: list[Any] = []
    counts: Counter[str] = Counter()
    fruitless_since: int | None = None  # epoch from which no sample has been usable
    items = _items_with_epoch(source, reader, readers, start, seed, leftover, resume_epoch)
    for position, item, epoch in items:
        counts["shards"] += position.offset == 0  # a unit finished (read to its end or broken off)
        retries = take_http_retries()  # this process is this reader's alone
        if retries:
            counts["http_retries"] += retries
        example = None
        if isinstance(item, Skip):
            counts[item.counter] += 1
        else:
            try:
                example = source.decode(item, seed, epoch, counts)
            except BadSample as exc:
                counts[f"skipped_{exc.kind}"] += 1
                log.debug("data: sample skipped (%s): %s", exc.kind, exc)
        if example is None:
            fruitless_since = epoch if fruitless_since is None else fruitless_since
            if epoch >= fruitless_since + 2:
                raise BadDataError(
                    f"data: reader {reader} of {readers} found no usable sample in a whole epoch of its "
                    f"units ({_describe(counts)}); check the URLs and the data"
                )
            continue
        fruitless_since = None
        counts["samples"] += 1
        examples.append(example)
        if len(examples) == micro_batch:
            yield source.collate(examples), position, counts
            examples, counts = [], Counter()


class _Readers(IterableDataset):
    """This rank's readers, one per DataLoader worker; worker ``i`` plays reader ``(i + first) % workers``."""

    def __init__(
        self,
        source: StreamingSource,
        *,
        rank: int,
        workers: int,
        world_size: int,
        starts: list[Position],
        first: int,
        seed: int,
        micro_batch: int,
        leftover: list[list[Leftover]],
        resume_epoch: int,
    ) -> None:
        self.source, self.rank, self.workers, self.world_size = source, rank, workers, world_size
        self.starts, self.first, self.seed, self.micro_batch = starts, first, seed, micro_batch
        self.leftover, self.resume_epoch = leftover, resume_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        local = ((info.id if info else 0) + self.first) % self.workers
        batches = reader_batches(
            self.source,
            self.rank * self.workers + local,
            self.world_size * self.workers,
            self.starts[local],
            self.seed,
            self.micro_batch,
            self.leftover[local],
            self.resume_epoch,
        )
        for batch, position, counts in batches:
            yield {"batch": batch, "reader": local, "position": position, "counts": dict(counts)}


def _unchanged(item: Any) -> Any:
    return item


# --------------------------------------------------------------------------- training-loop side


class ShardedStream:
    """The train stream of a ``StreamingSource`` on one rank (``vlforge.data.stream.TrainStream``)."""

    def __init__(
        self,
        source: StreamingSource,
        *,
        micro_batch: int,
        seed: int,
        num_workers: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.source, self.micro_batch, self.seed = source, micro_batch, seed
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.workers = max(1, num_workers)  # readers on this rank (the main process when 0 workers)
        readers, units = world_size * self.workers, len(source.units(0, seed))
        if units < readers:
            raise ValueError(
                f"data: {units} units (shards) cannot be split over {readers} readers "
                f"({world_size} ranks x {self.workers} workers); use fewer train.num_workers or more shards"
            )
        self.positions = [Position()] * self.workers
        self.leftover: list[list[Leftover]] = [[] for _ in range(self.workers)]
        self.resume_epoch = 0  # where readers go after their leftovers
        self.next_reader = 0
        self.counts: Counter[str] = Counter()
        self._batches: Iterator[dict[str, Any]] | None = None

    @property
    def epoch(self) -> int:
        """The earliest epoch any reader of this rank is in (a leftover unit's own epoch)."""
        epochs = [p.epoch for p in self.positions if p.epoch != LEFTOVER]
        epochs += [item.epoch for items in self.leftover for item in items]
        return min(epochs, default=self.resume_epoch)

    def batches_per_epoch(self) -> int:
        return max(1, self.source.num_samples() // (self.world_size * self.micro_batch))

    def next(self) -> dict[str, Any]:
        if self._batches is None:
            self._batches = self._start()
        item = next(self._batches)
        reader = item["reader"]
        self.positions[reader] = Position(*item["position"])
        self.next_reader = (reader + 1) % self.workers
        self.counts.update(item["counts"])
        check_bad_data(self.counts, self.source.bad_data)
        return item["batch"]

    def _start(self) -> Iterator[dict[str, Any]]:
        readers = _Readers(
            self.source,
            rank=self.rank,
            workers=self.workers,
            world_size=self.world_size,
            starts=list(self.positions),
            first=self.next_reader,
            seed=self.seed,
            micro_batch=self.micro_batch,
            leftover=self.leftover,
            resume_epoch=self.resume_epoch,
        )
        loader = DataLoader(
            readers,
            batch_size=None,  # workers build whole batches
            collate_fn=_unchanged,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        return iter(loader)

    def state_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "workers": self.workers,
            "positions": [list(position) for position in self.positions],
            "next_reader": self.next_reader,
            "counts": dict(self.counts),
            "leftover": [[list(item) for item in items] for items in self.leftover],
            "resume_epoch": self.resume_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``. At another world size or worker count, ``state["every_rank"]``
        (every saved rank's state, as the engine passes it) lets the epoch go on elastically."""
        positions = [Position(*position) for position in state["positions"]]
        self.counts = Counter(state["counts"])
        self._batches = None
        if (state["world_size"], state["workers"]) == (self.world_size, self.workers):
            self.positions, self.next_reader = positions, state["next_reader"]
            self.leftover = [[Leftover(*item) for item in items] for items in state.get("leftover", [])]
            self.leftover = self.leftover or [[] for _ in range(self.workers)]
            self.resume_epoch = state.get("resume_epoch", 0)
            return
        every_rank = state.get("every_rank")
        if every_rank and not any(p[0] == LEFTOVER for saved in every_rank for p in saved["positions"]):
            self._deal_leftovers(every_rank)
            return
        epoch = min(position.epoch for position in positions)
        log.warning(
            "data: the checkpoint was taken with %d ranks x %d workers, this run has %d x %d: "
            "readers restart at the beginning of epoch %d (samples of it may repeat)",
            state["world_size"],
            state["workers"],
            self.world_size,
            self.workers,
            epoch,
        )
        self.positions, self.next_reader = [Position(epoch)] * self.workers, 0

    def _deal_leftovers(self, every_rank: list[dict[str, Any]]) -> None:
        """This rank's share of the units the saved readers left unfinished (see the module docs)."""
        leftover, self.resume_epoch = unfinished_units(self.source, self.seed, every_rank)
        readers = self.world_size * self.workers
        self.leftover = [
            leftover[self.rank * self.workers + local :: readers] for local in range(self.workers)
        ]
        self.positions, self.next_reader = [Position(LEFTOVER)] * self.workers, 0
        # Bad-data counters go on per rank where the rank existed before.
        self.counts = Counter(every_rank[self.rank]["counts"] if self.rank < len(every_rank) else {})

    def metrics(self) -> dict[str, float]:
        """``data/<counter>`` for every counter of this rank, plus ``data/skipped_fraction``."""
        metrics = {f"data/{name}": float(value) for name, value in sorted(self.counts.items())}
        metrics["data/skipped_fraction"] = skipped_fraction(self.counts)
        return metrics


def unfinished_units(
    source: StreamingSource, seed: int, every_rank: list[dict[str, Any]]
) -> tuple[list[Leftover], int]:
    """Units of the epochs in progress that no saved reader finished, and the epoch after them.

    Saved reader ``rank * workers + local`` had share ``units(e)[reader::readers]``; its position
    says how much of it is done.
    """
    positions = [Position(*p) for saved in every_rank for p in saved["positions"]]
    readers = len(positions)
    first, last = min(p.epoch for p in positions), max(p.epoch for p in positions)
    leftover = []
    for epoch in range(first, last + 1):
        for index in range(len(source.units(epoch, seed))):
            done = positions[index % readers]
            in_share = index // readers
            if (epoch, in_share) < (done.epoch, done.cursor):
                continue  # finished
            offset = done.offset if (epoch, in_share) == (done.epoch, done.cursor) else 0
            leftover.append(Leftover(epoch, index, offset))
    return leftover, last + 1


# --------------------------------------------------------------------------- bad-data policy


def skipped_fraction(counts: Counter[str]) -> float:
    skipped = sum(value for name, value in counts.items() if name.startswith("skipped_"))
    return skipped / max(1, skipped + counts["samples"])


def check_bad_data(counts: Counter[str], policy: BadDataConfig) -> None:
    """Raise ``BadDataError`` when the skipped samples or failed units pass the policy's fractions."""
    skipped = sum(value for name, value in counts.items() if name.startswith("skipped_"))
    if skipped + counts["samples"] < policy.min_samples:
        return
    fraction = skipped_fraction(counts)
    if fraction > policy.max_skipped_fraction:
        raise BadDataError(
            f"data: {skipped} of {skipped + counts['samples']} samples read were skipped "
            f"({fraction:.1%} > data.bad_data.max_skipped_fraction = {policy.max_skipped_fraction}): "
            f"{_describe(counts)}. The run stops; repair the data or raise the threshold"
        )
    failed = sum(value for name, value in counts.items() if name.startswith("shards_"))
    if counts["shards"] and failed / counts["shards"] > policy.max_failed_shard_fraction:
        raise BadDataError(
            f"data: {failed} of {counts['shards']} shards could not be read to their end "
            f"({failed / counts['shards']:.1%} > data.bad_data.max_failed_shard_fraction = "
            f"{policy.max_failed_shard_fraction}): {_describe(counts)}. The run stops; check the URLs"
        )


def _describe(counts: Counter[str]) -> str:
    problems = {
        name: value for name, value in counts.items() if name.startswith(("skipped_", "shards_")) and value
    }
    return ", ".join(f"{name} {value}" for name, value in sorted(problems.items())) or "nothing read"
