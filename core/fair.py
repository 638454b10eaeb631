"""Fair share: the order in which competing batches get the next unit of work.

Round-robin across projects first, then across a project's batches; FIFO within a
batch. A project with one small batch therefore gets every other unit while
another project's huge batch runs, however many batches that project has.

Used for engine request admission inside a worker (a unit is one request slot of
the engine's in-flight budget) and for handing shard tasks to workers (a unit is
one shard). Not thread-safe: callers hold their own lock (or run in one event loop).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        # project -> batch -> items; OrderedDicts rotate: the key served last moves to the end.
        self._projects: OrderedDict[str, OrderedDict[str, deque[T]]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def push(self, project: str, batch: str, item: T) -> None:
        batches = self._projects.setdefault(project, OrderedDict())
        batches.setdefault(batch, deque()).append(item)
        self._size += 1

    def pop(self) -> T:
        """The next item in fair order (IndexError when empty)."""
        for project, batches in self._projects.items():
            for batch, items in batches.items():
                item = items.popleft()
                self._size -= 1
                if items:
                    batches.move_to_end(batch)
                else:
                    del batches[batch]
                if batches:
                    self._projects.move_to_end(project)
                else:
                    del self._projects[project]
                return item
        raise IndexError("pop from an empty FairQueue")

    def peek(self) -> T:
        for batches in self._projects.values():
            for items in batches.values():
                return items[0]
        raise IndexError("peek into an empty FairQueue")

    def remove_batch(self, batch: str) -> list[T]:
        """Take every item of one batch out (a cancel); returns them."""
        removed: list[T] = []
        for project in list(self._projects):
            batches = self._projects[project]
            items = batches.pop(batch, None)
            if items:
                removed.extend(items)
            if not batches:
                del self._projects[project]
        self._size -= len(removed)
        return removed

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        removed: list[T] = []
        for project in list(self._projects):
            batches = self._projects[project]
            for batch in list(batches):
                keep = deque(item for item in batches[batch] if not predicate(item))
                removed.extend(item for item in batches[batch] if predicate(item))
                if keep:
                    batches[batch] = keep
                else:
                    del batches[batch]
            if not batches:
                del self._projects[project]
        self._size -= len(removed)
        return removed

    def __iter__(self) -> Iterator[T]:
        for batches in self._projects.values():
            for items in batches.values():
                yield from items
