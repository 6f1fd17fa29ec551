"""Block checks ahead of the loader, in a helper process on another core.

The loader checks each block of a target shard the first time it hands out any of its rows
(:mod:`.block_check`). Windows come in shuffled order, so that first check is an extra read of
the whole block from memory, which the loader later reads again window by window: on one core
that costs about 15 % of the loader's first epoch. Here a helper process does the same checks
*ahead* of the loader, in the order the loader will first touch the blocks, and marks each
block it verified in a flag array shared with the loader (one byte per block). The loader's
hot path is then a flag lookup; a block the helper has not reached (or could not verify) is
checked by the loader itself, exactly as without a helper, so correctness never depends on it:

- the helper verifies the same bytes: it maps the same file (same device, inode, size and
  mtime as the reader saw when it registered the split; the reader compares them again when it
  maps the shard) and runs the very :class:`~.block_check.BlockChecker` the reader runs;
- a block that fails (bit rot, out-of-range ids) is simply not marked: the loader reaches it,
  checks it and raises the usual one-line :class:`~cocomix.core.errors.IntegrityError`;
- the helper is a daemon that ignores Ctrl-C, exits when its parent does (its end of the pipe
  closes), and anything that goes wrong inside it only costs speed.

One helper per process serves every reader of that process. It starts when a training stream
over a split of at least :data:`MIN_BLOCKS` blocks asks for it and the process may use two or
more CPUs; ``COCOMIX_CHECK_AHEAD=0`` switches it off, ``=1`` forces it on.

Shape legend: a *set* is one label set (window offset ``r``) of a split; its blocks are numbered
globally in shard order (block ``b`` of shard ``i`` is ``base[i] + b``), so the blocks a window
touches are one contiguous range of ids.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections import OrderedDict
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np

from cocomix.storage import block_check

log = logging.getLogger(__name__)

MIN_BLOCKS = 64  #: splits with fewer blocks are checked in-process only (a helper would not pay off)
CHUNK_WINDOWS = 1 << 16  #: windows per job the stream hands on (the helper stays about this far ahead)
OPEN_SHARDS = 64  #: shards the helper keeps mapped


class _Memory(shared_memory.SharedMemory):
    """Shared memory whose garbage collection tolerates views still handed out (flags of shards a
    reader still holds): the mapping then goes when the last view does."""

    def __del__(self) -> None:
        try:
            self.close()
        except BufferError:
            pass


def enabled() -> bool:
    """Whether a check-ahead helper may run: ``COCOMIX_CHECK_AHEAD`` (0/1), else two or more usable CPUs."""
    setting = os.environ.get("COCOMIX_CHECK_AHEAD", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return usable >= 2


def file_identity(path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SetLayout(NamedTuple):
    """One label set's blocks: shard ``i`` covers tokens ``[starts[i], ends[i])`` and owns block ids
    ``[base[i], base[i] + n_blocks[i])``; its flags start at ``flag_base`` in the shared array."""

    flag_base: int
    starts: np.ndarray
    ends: np.ndarray
    base: np.ndarray
    block_rows: int

    @property
    def n_blocks(self) -> int:
        return int(self.base[-1] + -(-(self.ends[-1] - self.starts[-1]) // self.block_rows)) if len(self.base) else 0


def layout(entries: list[dict], flag_base: int) -> SetLayout | None:
    """The block layout of one set's shard entries (sorted by start), or None when some shard has no
    block checksums or the block sizes differ (such sets are checked in-process only)."""
    records = [e.get(block_check.KEY) for e in entries]
    if not entries or any(r is None for r in records) or len({int(r["rows_per_block"]) for r in records}) != 1:
        return None
    block_rows = int(records[0]["rows_per_block"])
    starts = np.array([e["start"] for e in entries], np.int64)
    ends = np.array([e["end"] for e in entries], np.int64)
    counts = -(-(ends - starts) // block_rows)
    base = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return SetLayout(flag_base, starts, ends, base, block_rows)


def total_blocks(sets: dict[int, list[dict]]) -> int:
    """Blocks of the sets (offset -> sorted shard entries) a helper could check (those with block checksums)."""
    layouts = (layout(entries, 0) for entries in sets.values())
    return sum(lay.n_blocks for lay in layouts if lay is not None)


def first_touch(lay: SetLayout, starts: np.ndarray, context: int) -> np.ndarray:
    """Block ids (within the set) that windows ``[s, s + context)`` touch, in the order the windows
    first touch them, each once."""
    starts = np.asarray(starts, np.int64)
    if not len(starts):
        return np.zeros(0, np.int64)
    stops = np.minimum(starts + context, lay.ends[-1])
    i0 = np.searchsorted(lay.starts, starts, side="right") - 1
    i1 = np.searchsorted(lay.starts, stops - 1, side="right") - 1
    g0 = lay.base[i0] + (starts - lay.starts[i0]) // lay.block_rows
    g1 = lay.base[i1] + (stops - 1 - lay.starts[i1]) // lay.block_rows
    counts = g1 - g0 + 1
    ids = np.repeat(g0 - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(int(counts.sum()))
    unique, first = np.unique(ids, return_index=True)
    return unique[np.argsort(first, kind="stable")]


class SplitFlags:
    """Main-process side of one split of one reader: the shared flag array (one byte per block of
    every set with block checksums) and what the helper needs to find and check those blocks."""

    def __init__(self, reader, split: str, columns: tuple[str, ...]) -> None:
        self.columns = columns
        self.sets: dict[int, SetLayout] = {}
        self.shards: dict[str, tuple[int, int]] = {}  #: path -> (its first flag, its blocks)
        table = {}
        total = 0
        self.complete: dict[int, int] = {}  #: set -> the flag the helper raises once every block of the set is verified
        for r in reader.offsets:
            entries = reader._by_set[(split, r)]
            lay = layout(entries, total)
            if lay is None:
                continue
            self.sets[r] = lay
            table[r] = [lay, [(e["path"], e["rows"], e[block_check.KEY]) for e in entries], None]
            for e, b in zip(entries, lay.base):
                n = -(-int(e["rows"]) // lay.block_rows)
                self.shards[e["path"]] = (total + int(b), n)
            total += lay.n_blocks
        self.n_flags = total
        for r in table:  # after the block flags: one "whole set verified" flag per set
            self.complete[r] = table[r][2] = total + len(self.complete)
        self.memory = _Memory(create=True, size=max(total + len(self.complete), 1))
        self.memory.buf[:total + len(self.complete)] = bytes(total + len(self.complete))
        self.identities: dict[str, tuple] = {}
        for path in self.shards:
            try:
                self.identities[path] = file_identity(reader.path / path)
            except OSError:
                pass  # the reader refuses the missing shard when it gets there
        self.message = ("register", self.memory.name, str(reader.path), columns, reader.n_latents, reader.ignore_id,
                        table, self.identities)

    def set_verified(self, r: int) -> bool:
        """Whether the helper has verified every block of set ``r`` (then nothing of it needs handing on)."""
        return r in self.complete and self.memory.buf[self.complete[r]] == 1

    def view(self, path: str, identity: tuple):
        """The flags of shard ``path`` (a writable memoryview) when the file the reader mapped is the one
        the helper was told about; else None (the reader then keeps private flags)."""
        where = self.shards.get(path)
        if where is None or self.identities.get(path) != identity:
            return None
        first, n = where
        return self.memory.buf[first:first + n]

    def release(self) -> None:
        try:
            self.memory.unlink()
        except FileNotFoundError:
            pass


class Helper:
    """The check-ahead helper process of this process (see :func:`helper`).

    A plain ``python -c`` child (not ``multiprocessing``, which re-runs the parent's main script and
    fails for ``python -`` or notebooks) reading pickled messages on its stdin, a pipe whose only
    write end this process holds: when this process ends, however, the helper reads EOF and exits.
    A message goes straight into the pipe when it fits (no thread hand-off on the loader's path);
    what does not fit, and everything after it, is written by a feeder thread, in order."""

    def __init__(self) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, "-c", "from cocomix.storage.block_ahead import serve; serve()"],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._fd = self.process.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._lock = threading.Lock()
        self._backlog: queue.SimpleQueue = queue.SimpleQueue()  #: bytes the feeder writes, in order
        self._queued = 0  #: chunks in the backlog not yet written (messages wait behind them)
        self._broken = False
        threading.Thread(target=self._feed, daemon=True, name="cocomix-block-check-feed").start()

    def send(self, message) -> None:
        import pickle

        data = memoryview(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        with self._lock:
            if self._broken:
                return
            if not self._queued:
                try:
                    data = data[os.write(self._fd, data):]
                except BlockingIOError:
                    pass
                except OSError:
                    self._broken = True
                    return
            if len(data):
                self._queued += 1
                self._backlog.put(data)

    def _feed(self) -> None:
        import select

        while True:
            data = self._backlog.get()
            try:
                while len(data):
                    select.select([], [self._fd], [])
                    try:
                        data = data[os.write(self._fd, data):]
                    except BlockingIOError:
                        continue
            except (OSError, ValueError):
                log.debug("the check-ahead helper is gone; the loader checks every block itself")
                with self._lock:
                    self._broken = True
                return
            with self._lock:
                self._queued -= 1

    def alive(self) -> bool:
        return not self._broken and self.process.poll() is None


_helper: Helper | None = None
_helper_lock = threading.Lock()


def helper() -> Helper | None:
    """This process's helper, started on first use; None when it cannot start (the loader then checks alone)."""
    global _helper
    with _helper_lock:
        if _helper is None or not _helper.alive():
            try:
                _helper = Helper()
            except (OSError, RuntimeError) as err:  # no processes left, a frozen interpreter, ...
                log.debug("no check-ahead helper (%s); the loader checks every block itself", err)
                return None
        return _helper


# ----------------------------------------------------------------------------- the helper process

class _Registered:
    def __init__(self, shm_name: str, folder: str, columns, n_latents: int, ignore: int, table: dict, identities: dict):
        self.memory = _attach(shm_name)
        self.flags = np.ndarray((self.memory.size,), np.uint8, buffer=self.memory.buf)
        self.folder, self.columns, self.n_latents, self.ignore = folder, tuple(columns), n_latents, ignore
        self.table, self.identities = table, identities
        self.open: OrderedDict[str, block_check.BlockChecker | None] = OrderedDict()

    def checker(self, path: str, rows: int, record: dict) -> block_check.BlockChecker | None:
        """The shard's BlockChecker over this process's own mapping, or None when the file is not the
        one registered or not readable as one record batch (the loader will say what is wrong)."""
        if path in self.open:
            self.open.move_to_end(path)
            return self.open[path]
        import pyarrow as pa

        checker = None
        file = os.path.join(self.folder, path)
        try:
            if file_identity(file) == self.identities.get(path):
                ipc = pa.ipc.open_file(pa.memory_map(file, "r"))
                batch = ipc.get_batch(0) if ipc.num_record_batches == 1 else None
                if batch is not None and batch.num_rows == rows:
                    where = f"shard {path} of {self.folder}"
                    checker = block_check.BlockChecker(where, block_check.column_rows(batch), record,
                                                       block_check.label_range_check(where, self.n_latents, self.ignore))
        except Exception as err:  # noqa: BLE001 - any failure here only means the loader checks this shard itself
            log.debug("check-ahead skips %s: %s", path, err)
        self.open[path] = checker
        if len(self.open) > OPEN_SHARDS:
            self.open.popitem(last=False)
        return checker

    def run(self, r: int, starts: np.ndarray, context: int, parent: int) -> None:
        lay, shards, complete = self.table[r]
        for count, g in enumerate(first_touch(lay, starts, context).tolist()):
            if count % 256 == 0 and os.getppid() != parent:
                raise SystemExit(0)
            if self.flags[lay.flag_base + g]:
                continue
            i = int(np.searchsorted(lay.base, g, side="right")) - 1
            path, rows, record = shards[i]
            checker = self.checker(path, rows, record)
            if checker is None:
                continue
            lo = (g - int(lay.base[i])) * lay.block_rows
            try:
                checker.check(lo, min(lo + lay.block_rows, rows), self.columns)
            except Exception:  # noqa: BLE001 - left unmarked: the loader checks it and raises the error itself
                continue
            self.flags[lay.flag_base + g] = 1
        if self.flags[lay.flag_base:lay.flag_base + lay.n_blocks].all():
            self.flags[complete] = 1


def _attach(name: str) -> _Memory:
    """The parent's shared memory, without this process's resource tracker ever owning (or unlinking) it."""
    try:
        return _Memory(name=name, track=False)  # Python 3.13+
    except TypeError:
        from multiprocessing import resource_tracker

        resource_tracker.register = lambda *args, **kwargs: None  # this helper process only
        return _Memory(name=name)


def serve() -> None:
    """The helper's loop over pickled messages on stdin (from the parent, through a private pipe):
    ``register`` a split's flags, ``check`` windows of a set, ``release`` a split."""
    import pickle
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = os.getppid()
    stream = sys.stdin.buffer
    registered: dict[str, _Registered] = {}
    while True:
        try:
            message = pickle.load(stream)
        except (EOFError, OSError, pickle.UnpicklingError):  # the parent is gone
            return
        kind, name = message[0], message[1]
        try:
            if kind == "register":
                registered[name] = _Registered(*message[1:])
            elif kind == "release":
                gone = registered.pop(name, None)
                if gone is not None:
                    del gone.flags
                    gone.open.clear()
                    gone.memory.close()
            elif kind == "check" and name in registered:
                registered[name].run(*message[2:], parent)
        except SystemExit:
            return
        except Exception as err:  # noqa: BLE001 - the loader checks whatever the helper does not
            log.debug("check-ahead message %s failed: %s", kind, err)
