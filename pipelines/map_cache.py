"""The control-map cache: recently made maps, bounded by bytes as well as by count.

A count alone does not bound memory: one map of an elongated image at a high detection
resolution holds as much as a hundred small ones. Least recently used maps go first; a map
larger than the whole budget is not kept at all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


def image_bytes(image: Any) -> int:
    """The memory a PIL image's pixels hold. PIL stores every 8-bit mode with 2 to 4 bands
    (RGB included) as 4 bytes a pixel, so count 4: an upper bound for every map mode."""
    width, height = image.size
    return width * height * 4


class MapCache:
    def __init__(self, max_bytes: int, max_entries: int = 64):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._maps: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            found = self._maps.get(key)
            if found is None:
                return None
            self._maps.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, control_map: Any) -> None:
        size = image_bytes(control_map)
        with self._lock:
            self._drop(key)
            if size > self.max_bytes or self.max_entries < 1:
                return
            self._maps[key] = (control_map, size)
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._maps) > self.max_entries:
                self._drop(next(iter(self._maps)))

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

    def _drop(self, key: Hashable) -> None:
        found = self._maps.pop(key, None)
        if found is not None:
            self._bytes -= found[1]
