"""The bipartite user-item graph as compact arrays: id maps, edges, degrees, the normalised adjacency.

State grows like arrays, not Python objects (a dict of edges plus lists of neighbours cost ~110
bytes per edge): edges are `user << 32 | item` keys in one sorted int64 array with uint32 event
counts, plus the users of each item as int32 grouped by item: 16 bytes per edge. A micro-batch's new
edges go to small sorted pending arrays (keyed user-first and item-first); they are merged into the
main arrays at `MERGE_EDGES` edges or when the whole adjacency is needed, because a merge costs
O(edges): merging every batch would make a batch's cost grow with the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

ITEM_MASK = 0xFFFFFFFF
MERGE_EDGES = 1 << 18  # pending edges that trigger a merge: ~3 MB, a merge every ~260k new edges
MERGE_IDS = 1 << 16  # ids added since the last index merge, kept in a dict meanwhile


def edge_keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """`user << 32 | item` for each pair: the graph's edge key, in the users' order when sorted."""
    return np.asarray(users, dtype=np.int64) << 32 | np.asarray(items, dtype=np.int64)


def unique_edges(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop repeated (user, item) pairs: the graph is binary even where events repeat."""
    keys = np.unique(edge_keys(users, items))
    return keys >> 32, keys & ITEM_MASK


def find_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `keys` is or would go in the sorted array `sorted_keys`, and which are there."""
    pos = np.searchsorted(sorted_keys, keys)
    found = pos < len(sorted_keys)
    found[found] = sorted_keys[pos[found]] == keys[found]
    return pos, found


def edge_test(users: np.ndarray, items: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A membership test of (users, items) pairs against these edges (what `InteractionGraph.has_edges`
    is for a growing graph)."""
    known = np.unique(edge_keys(users, items))
    return lambda u, i: find_sorted(known, edge_keys(u, i))[1]


def normalized_adjacency(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph as a torch CSR tensor of shape (n_users+n_items)^2.

    Isolated nodes get empty rows, so their propagated embedding is their own layer-0 share only.
    """
    keys = np.unique(edge_keys(users, items))
    u, i = keys >> 32, keys & ITEM_MASK
    deg_u, deg_i = np.bincount(u, minlength=n_users), np.bincount(i, minlength=n_items)
    return _bipartite_csr(keys, u[np.argsort(i, kind="stable")], deg_u, deg_i)


def _bipartite_csr(keys: np.ndarray, item_users: np.ndarray, deg_u: np.ndarray, deg_i: np.ndarray) -> torch.Tensor:
    """The symmetric normalised adjacency from the edges twice over: `keys` sorted (user rows) and
    `item_users` grouped by item (item rows). Indices are int32 where they fit: half the memory of
    int64, and torch's CSR product measured ~1.5x faster with them."""
    n_users, n_items = len(deg_u), len(deg_i)
    n = n_users + n_items
    index = np.int32 if max(n, 2 * len(keys)) < 2**31 else np.int64
    (cols_u, values_u), (cols_i, values_i) = _halves(keys, item_users, deg_u, deg_i, index)
    cols_u += n_users
    crow = _row_starts(np.concatenate([deg_u, deg_i])).astype(index)
    return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(np.concatenate([cols_u, cols_i])),
                                   torch.from_numpy(np.concatenate([values_u, values_i])), size=(n, n))


def _bipartite_blocks(keys: np.ndarray, item_users: np.ndarray, deg_u: np.ndarray,
                      deg_i: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The two blocks of the same adjacency as CSR tensors: users x items (R) and items x users (R^T)."""
    n_users, n_items = len(deg_u), len(deg_i)
    index = np.int32 if max(n_users + n_items, len(keys)) < 2**31 else np.int64
    (cols_u, values_u), (cols_i, values_i) = _halves(keys, item_users, deg_u, deg_i, index)
    return tuple(torch.sparse_csr_tensor(torch.from_numpy(_row_starts(deg).astype(index)), torch.from_numpy(cols),
                                         torch.from_numpy(values), size=size)
                 for deg, cols, values, size in ((deg_u, cols_u, values_u, (n_users, n_items)),
                                                 (deg_i, cols_i, values_i, (n_items, n_users))))


def _halves(keys: np.ndarray, item_users: np.ndarray, deg_u: np.ndarray, deg_i: np.ndarray,
            index: type) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(column indices, values) of the user rows (items numbered from 0) and of the item rows:
    1 / sqrt(user degree * item degree) per edge."""
    inv_u = np.zeros(len(deg_u), dtype=np.float32)
    np.divide(1.0, np.sqrt(deg_u, dtype=np.float32), out=inv_u, where=deg_u > 0)
    inv_i = np.zeros(len(deg_i), dtype=np.float32)
    np.divide(1.0, np.sqrt(deg_i, dtype=np.float32), out=inv_i, where=deg_i > 0)
    cols_u, cols_i = (keys & ITEM_MASK).astype(index), item_users.astype(index)
    return (cols_u, np.repeat(inv_u, deg_u) * inv_i[cols_u]), (cols_i, np.repeat(inv_i, deg_i) * inv_u[cols_i])


def _neighbours(ptr: np.ndarray, merged: np.ndarray, pending: np.ndarray, nodes: np.ndarray,
                cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(position in `nodes`, neighbour) of each edge of these nodes, grouped by position: first from
    their merged rows (row starts `ptr`, neighbours `merged`, masked to 32 bits), then from `pending`
    (sorted node << 32 | neighbour keys); at most `cap` per node (0 = all). A node added since the
    row starts were computed has an empty merged row."""
    nodes = np.asarray(nodes, dtype=np.int64)
    known = nodes < len(ptr) - 1
    starts, lengths = np.zeros(len(nodes), dtype=np.int64), np.zeros(len(nodes), dtype=np.int64)
    starts[known] = ptr[nodes[known]]
    lengths[known] = ptr[nodes[known] + 1] - starts[known]
    p_starts = np.searchsorted(pending, nodes << 32)
    p_lengths = np.searchsorted(pending, (nodes + 1) << 32) - p_starts
    if cap:
        lengths = np.minimum(lengths, cap)
        p_lengths = np.minimum(p_lengths, cap - lengths)
    # each node's merged neighbours, then its pending ones, scattered to their place (no sort)
    totals = lengths + p_lengths
    base = np.cumsum(totals) - totals
    values = np.empty(int(totals.sum()), dtype=np.int64)
    owner, pos = _segments(starts, lengths)
    values[base[owner] + pos - starts[owner]] = merged[pos]
    p_owner, p_pos = _segments(p_starts, p_lengths)
    values[base[p_owner] + lengths[p_owner] + p_pos - p_starts[p_owner]] = pending[p_pos]
    return np.repeat(np.arange(len(nodes)), totals), values & ITEM_MASK


def _segments(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, position) of every element of the segments [starts[k], starts[k] + lengths[k])."""
    owner = np.repeat(np.arange(len(starts)), lengths)
    first = np.cumsum(lengths) - lengths
    return owner, np.arange(len(owner)) - first[owner] + starts[owner]


def _insert(a: np.ndarray, at: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.insert(a, at, b) for positions `at` already sorted: one scatter, without the sort of the
    positions np.insert does (most of a large merge's time)."""
    if not len(a):
        return np.array(b, dtype=a.dtype)
    out = np.empty(len(a) + len(b), dtype=a.dtype)
    to = at + np.arange(len(b))
    out[to] = b
    keep = np.ones(len(out), dtype=bool)
    keep[to] = False
    out[keep] = a
    return out


def _count_into(degrees: np.ndarray, nodes: np.ndarray) -> None:
    """degrees[n] += 1 for every n in nodes, in O(len(nodes)) for a few nodes, O(len(degrees)) for many."""
    if 16 * len(nodes) < len(degrees):
        np.add.at(degrees, nodes, 1)
    else:
        degrees += np.bincount(nodes, minlength=len(degrees)).astype(degrees.dtype)


def _row_starts(degrees: np.ndarray) -> np.ndarray:
    """Start of each node's row in edges grouped by node (and the end of the last)."""
    starts = np.zeros(len(degrees) + 1, dtype=np.int64)
    np.cumsum(degrees, out=starts[1:])
    return starts


class _Array:
    """A 1-d numpy array with amortised O(1) appends."""

    def __init__(self, dtype: type):
        self._data = np.zeros(1024, dtype=dtype)
        self.n = 0

    def resize(self, n: int) -> None:
        """Grow to n entries (new ones zero)."""
        if n > len(self._data):
            grown = np.zeros(max(n, 2 * len(self._data)), dtype=self._data.dtype)
            grown[:self.n] = self._data[:self.n]
            self._data = grown
        self.n = max(self.n, n)

    def extend(self, values: np.ndarray) -> None:
        n = self.n
        self.resize(n + len(values))
        self._data[n:self.n] = values

    @property
    def view(self) -> np.ndarray:
        return self._data[:self.n]

    @property
    def nbytes(self) -> int:
        return self._data.nbytes


class _Names(Sequence):
    """The external ids of an IdMap in index order, decoded on access."""

    def __init__(self, ids: "IdMap"):
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self._ids.name(j) for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._ids.name(k)

    def __iter__(self) -> Iterator[str]:
        return (self._ids.name(j) for j in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


class _Neighbours:
    """`graph.user_items[u]` / `graph.item_users[i]`: one node's neighbours as an array."""

    def __init__(self, rows):
        self._rows = rows

    def __getitem__(self, node: int) -> np.ndarray:
        return self._rows(np.array([node]))[1]


class IdMap:
    """External ids (strings) <-> dense internal indices, in order of first appearance.

    Names are UTF-8 in one buffer; lookups go through a sorted array of their hashes (Python's str
    hash: the index lives in memory only, rebuilt when a process loads the map), each hit checked
    against the name, plus a dict of the ids added since the last merge of that array. ~30 bytes
    per id where a dict of Python strings costs ~150.
    """

    def __init__(self, external: Sequence[str] = ()):
        self._buf = bytearray()
        self._ends = _Array(np.int64)
        self._hashes = np.zeros(0, dtype=np.int64)  # sorted
        self._order = np.zeros(0, dtype=np.int32)  # the index of each sorted hash's id
        self._recent: dict[str, int] = {}
        self.external = _Names(self)
        if external:
            self.add_all(list(external))

    def __len__(self) -> int:
        return self._ends.n

    def name(self, k: int) -> str:
        ends = self._ends.view
        return self._buf[ends[k - 1] if k else 0:ends[k]].decode()

    def encoded(self, lo: int, hi: int) -> tuple[bytes, np.ndarray]:
        """Ids lo..hi-1 as they are held: their UTF-8 bytes back to back, and each one's length."""
        ends = self._ends.view
        bounds = np.concatenate([[ends[lo - 1] if lo else 0], ends[lo:hi]]).astype(np.int64)
        return bytes(self._buf[bounds[0]:bounds[-1]]), np.diff(bounds)

    def get(self, ext: str) -> int | None:
        found = self._recent.get(ext)
        if found is None:
            found = int(self._lookup([ext])[0])
        return None if found < 0 else found

    def add_all(self, exts: Sequence[str]) -> np.ndarray:
        """Indices of `exts`, appending the unseen ones in order of first appearance."""
        if not len(self) and len(set(exts)) == len(exts):  # e.g. a store's ids: all new, built in bulk
            return self._extend_distinct(exts)
        idx = list(map(self._recent.get, exts))
        missing = [k for k, v in enumerate(idx) if v is None]
        if missing:
            new: list[bytes] = []
            for k, found in zip(missing, self._lookup([exts[k] for k in missing]).tolist()):
                if found < 0:
                    ext = exts[k]
                    found = self._recent.get(ext)  # an id new in this batch may repeat within it
                    if found is None:
                        found = self._recent[ext] = len(self) + len(new)
                        new.append(ext.encode())
                idx[k] = found
            if new:
                self._ends.extend(len(self._buf) + np.cumsum([len(name) for name in new]))
                self._buf += b"".join(new)
            if len(self._recent) > max(MERGE_IDS, len(self) // 8):
                self._merge()
        return np.array(idx, dtype=np.int64)

    def _extend_distinct(self, exts: Sequence[str]) -> np.ndarray:
        """Fill an empty map with distinct ids straight into the hash index (no dict on the way)."""
        names = [ext.encode() for ext in exts]
        self._ends.extend(np.cumsum([len(name) for name in names]))
        self._buf += b"".join(names)
        hashes = np.fromiter(map(hash, exts), dtype=np.int64, count=len(exts))
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._order = hashes[order], order.astype(np.int32)
        return np.arange(len(exts), dtype=np.int64)

    def _lookup(self, exts: list[str]) -> np.ndarray:
        """Index of each id in the merged hash array, -1 where absent."""
        hashes = np.fromiter(map(hash, exts), dtype=np.int64, count=len(exts))
        pos = np.searchsorted(self._hashes, hashes)
        out = np.full(len(exts), -1, dtype=np.int64)
        n = len(self._hashes)
        hit = pos < n
        hit[hit] = self._hashes[pos[hit]] == hashes[hit]
        hit = np.flatnonzero(hit)
        first = self._order[pos[hit]].astype(np.int64)  # the first id with the same hash
        same = self._same_names(first, [exts[k] for k in hit.tolist()])
        out[hit[same]] = first[same]
        for k in hit[~same].tolist():  # equal hashes, another name: the ids after it with that hash decide
            p, h = int(pos[k]) + 1, hashes[k]
            while p < n and self._hashes[p] == h:
                j = int(self._order[p])
                if self.name(j) == exts[k]:
                    out[k] = j
                    break
                p += 1
        return out

    def _same_names(self, idx: np.ndarray, exts: list[str]) -> np.ndarray:
        """Whether id idx[k] is exts[k], for all k at once (byte compares in numpy: a name decoded
        per id took 3% of the learner's time at 1M users)."""
        ends = self._ends.view
        starts = np.where(idx > 0, ends[idx - 1], 0)
        lengths = ends[idx] - starts
        query = [ext.encode() for ext in exts]
        q_lengths = np.fromiter(map(len, query), dtype=np.int64, count=len(query))
        same = lengths == q_lengths
        owner, at = _segments(starts[same], lengths[same])
        _, q_at = _segments(np.cumsum(q_lengths) - q_lengths, q_lengths * same)
        held = np.frombuffer(self._buf, dtype=np.uint8)[at]  # a copy: the buffer may grow afterwards
        differ = held != np.frombuffer(b"".join(query), dtype=np.uint8)[q_at]
        same[np.flatnonzero(same)[np.unique(owner[differ])]] = False
        return same

    def _merge(self) -> None:
        names, idx = list(self._recent), np.fromiter(self._recent.values(), dtype=np.int32, count=len(self._recent))
        hashes = np.fromiter(map(hash, names), dtype=np.int64, count=len(names))
        order = np.argsort(hashes, kind="stable")
        at = np.searchsorted(self._hashes, hashes[order])
        self._hashes = _insert(self._hashes, at, hashes[order])
        self._order = _insert(self._order, at, idx[order])
        self._recent = {}

    @property
    def nbytes(self) -> int:
        """Memory held, the dict of recent ids estimated at 150 bytes per entry."""
        return len(self._buf) + self._ends.nbytes + self._hashes.nbytes + self._order.nbytes + 150 * len(self._recent)


class InteractionGraph:
    """A growable bipartite graph: id maps, edges with event counts, degrees, neighbour lists.

    Adding a batch of events costs O(batch log edges) plus an amortised share of the merges; the
    normalised adjacency of the whole graph is built on demand (`normalized_adjacency`).
    """

    def __init__(self) -> None:
        self.users, self.items = IdMap(), IdMap()
        self._keys = np.zeros(0, dtype=np.int64)  # merged edges, sorted: the users' rows
        self._counts = np.zeros(0, dtype=np.uint32)  # events per merged edge
        self._item_users = np.zeros(0, dtype=np.int32)  # merged edges grouped by item: the items' rows
        self._user_ptr = np.zeros(1, dtype=np.int64)  # row starts over merged edges (nodes at the last merge)
        self._item_ptr = np.zeros(1, dtype=np.int64)
        self._pending = np.zeros(0, dtype=np.int64)  # edges since the last merge, sorted
        self._pending_counts = np.zeros(0, dtype=np.uint32)
        self._pending_by_item = np.zeros(0, dtype=np.int64)  # the same as item << 32 | user, sorted
        self._deg_u, self._deg_i = _Array(np.int32), _Array(np.int32)
        self.n_events = 0
        self.user_items, self.item_users = _Neighbours(self.items_of_users), _Neighbours(self.users_of_items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_edges(self) -> int:
        return len(self._keys) + len(self._pending)

    def add_users(self, exts: Sequence[str]) -> np.ndarray:
        """Internal indices of these external user ids; unseen ids become new users."""
        idx = self.users.add_all(exts)
        self._deg_u.resize(self.n_users)
        return idx

    def add_items(self, exts: Sequence[str]) -> np.ndarray:
        """Internal indices of these external item ids; unseen ids become new items."""
        idx = self.items.add_all(exts)
        self._deg_i.resize(self.n_items)
        return idx

    def add_interactions(self, users: np.ndarray, items: np.ndarray, counts: np.ndarray | None = None) -> int:
        """Record events on (user, item) pairs of internal indices: one each, or `counts` events on
        each of distinct pairs (a snapshot); returns how many edges are new."""
        keys = edge_keys(users, items)
        if counts is None:
            keys, counts = np.unique(keys, return_counts=True)
        elif len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            order = np.argsort(keys)
            keys, counts = keys[order], np.asarray(counts)[order]
        counts = np.array(counts, dtype=np.uint32)  # a copy: the graph adds to it
        self.n_events += int(counts.sum())
        if not self.n_edges:  # an empty graph (a restart's snapshot): the merged arrays in one pass
            self._load_sorted(keys, counts)
            return len(keys)
        fresh = self._count(self._keys, self._counts, keys, counts)
        keys, counts = keys[fresh], counts[fresh]
        fresh = self._count(self._pending, self._pending_counts, keys, counts)
        keys, counts = keys[fresh], counts[fresh]
        at = np.searchsorted(self._pending, keys)
        self._pending = _insert(self._pending, at, keys)
        self._pending_counts = _insert(self._pending_counts, at, counts)
        flipped = np.sort((keys & ITEM_MASK) << 32 | keys >> 32)
        self._pending_by_item = _insert(self._pending_by_item, np.searchsorted(self._pending_by_item, flipped), flipped)
        _count_into(self._deg_u.view, keys >> 32)
        _count_into(self._deg_i.view, keys & ITEM_MASK)
        if len(self._pending) >= MERGE_EDGES:
            self.merge()
        return len(keys)

    def _load_sorted(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Distinct sorted edges into an empty graph, the same arrays as adding them as pending and
        merging (item rows ordered by user), without the copies and searches (a third of a restart)."""
        users, items = keys >> 32, keys & ITEM_MASK
        self._keys, self._counts = keys, counts
        self._item_users = (np.sort(items << 32 | users) & ITEM_MASK).astype(np.int32)
        _count_into(self._deg_u.view, users)
        _count_into(self._deg_i.view, items)
        self._user_ptr, self._item_ptr = _row_starts(self._deg_u.view), _row_starts(self._deg_i.view)

    @staticmethod
    def _count(sorted_keys: np.ndarray, counts: np.ndarray, keys: np.ndarray, add: np.ndarray) -> np.ndarray:
        """Add `add` to the counts of the unique `keys` found in `sorted_keys`; the mask of those not found."""
        pos, found = find_sorted(sorted_keys, keys)
        counts[pos[found]] += add[found]
        return ~found

    def merge(self) -> None:
        """Move the pending edges into the main arrays: O(edges)."""
        new = self._pending
        if len(new):
            at = np.searchsorted(self._keys, new)
            self._keys = _insert(self._keys, at, new)
            self._counts = _insert(self._counts, at, self._pending_counts)
            # a new edge goes to the end of its item's row
            by_item = self._pending_by_item
            ends = self._item_ptr[np.minimum((by_item >> 32) + 1, len(self._item_ptr) - 1)]
            self._item_users = _insert(self._item_users, ends, (by_item & ITEM_MASK).astype(np.int32))
            self._pending = self._pending_by_item = np.zeros(0, dtype=np.int64)
            self._pending_counts = np.zeros(0, dtype=np.uint32)
        for kind, degrees in (("_user_ptr", self._deg_u.view), ("_item_ptr", self._deg_i.view)):
            if len(new) or len(getattr(self, kind)) != len(degrees) + 1:
                setattr(self, kind, _row_starts(degrees))

    def has_edges(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Which (user, item) pairs of internal indices are edges (a mask)."""
        keys = edge_keys(users, items)
        return find_sorted(self._keys, keys)[1] | find_sorted(self._pending, keys)[1]

    # ---- neighbours and degrees ------------------------------------------------------------------

    def items_of_users(self, users: np.ndarray, cap: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(position in `users`, item) of each edge of these users, grouped by position; at most
        `cap` per user (0 = all): the first of the merged edges, then pending ones."""
        return _neighbours(self._user_ptr, self._keys, self._pending, users, cap)

    def users_of_items(self, items: np.ndarray, cap: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(position in `items`, user) of each edge of these items, grouped by position; at most
        `cap` per item (0 = all): the first of the merged edges, then pending ones."""
        return _neighbours(self._item_ptr, self._item_users, self._pending_by_item, items, cap)

    def user_degrees(self, users: np.ndarray | None = None) -> np.ndarray:
        """Distinct items of each user (all users, or these)."""
        deg = self._deg_u.view
        return deg.astype(np.int64) if users is None else deg[np.asarray(users, dtype=np.int64)].astype(np.int64)

    def item_degrees(self, items: np.ndarray | None = None) -> np.ndarray:
        """Distinct users of each item (all items, or these)."""
        deg = self._deg_i.view
        return deg.astype(np.int64) if items is None else deg[np.asarray(items, dtype=np.int64)].astype(np.int64)

    # ---- the whole graph -------------------------------------------------------------------------

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, items, event counts) of every edge, sorted by user then item."""
        self.merge()
        return self._keys >> 32, self._keys & ITEM_MASK, self._counts.astype(np.int64)

    def event_counts(self) -> dict[tuple[str, str], int]:
        """Events per (external user, external item): for checks and small graphs (Python objects)."""
        users, items, counts = self.edges()
        names_u, names_i = self.users.external, self.items.external
        return {(names_u[u], names_i[i]): c for u, i, c in zip(users.tolist(), items.tolist(), counts.tolist())}

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of every edge, sorted by user then item."""
        users, items, _ = self.edges()
        return users, items

    def normalized_adjacency(self) -> torch.Tensor:
        self.merge()
        return _bipartite_csr(self._keys, self._item_users, self._deg_u.view, self._deg_i.view)

    def adjacency_blocks_snapshot(self) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """A function building the normalised adjacency's blocks R (users x items) and R^T as of now,
        for another thread (a background propagation) while the graph goes on changing: merges
        replace the edge arrays instead of writing into them, so only the degrees are copied."""
        self.merge()
        keys, item_users, deg_u, deg_i = self._keys, self._item_users, self._deg_u.view.copy(), self._deg_i.view.copy()
        return lambda: _bipartite_blocks(keys, item_users, deg_u, deg_i)

    @property
    def nbytes(self) -> int:
        """Memory held by the graph: edges, degrees, row starts and id maps."""
        arrays = (self._keys, self._counts, self._item_users, self._user_ptr, self._item_ptr, self._pending,
                  self._pending_counts, self._pending_by_item)
        return (sum(a.nbytes for a in arrays) + self._deg_u.nbytes + self._deg_i.nbytes
                + self.users.nbytes + self.items.nbytes)
