"""Length-aware routing: a predicted output length picks a bin, the bin picks the engine pool serving it,
and inside the pool the replica with the least predicted work left gets the request.

    router = BinRouter.build(bin_boundaries=[48, 160, 400], num_pools=2)   # 4 bins on 2 pools
    router.route(predicted_output_tokens=120)        # Route(bin_id=1, pool_id=0)

    book = PredictedWorkBook()
    book.report("a", work_tokens=[600, 300], reported_at_s=10.0)   # replica "a": two requests' work left
    book.ranked(["a", "b"], work_tokens=200)         # ["b", "a"]: "b" reported nothing, so holds nothing
    book.add("b", "req-7", work_tokens=1200, routed_at_s=10.5)
    book.ranked(["a", "b"], work_tokens=200)         # ["b", "a"]: one long request delays it less than two

Pure Python (no ray, no torch): the ingress feeds it the predictor's numbers and gets a typed answer.

Bins are the predictor's equal-mass intervals of the training length distribution: bin ``i`` holds
lengths ``bin_boundaries[i-1] < n <= bin_boundaries[i]`` (the first is open below, the last above), as
``cluster.predictor.lengths.bin_of`` (pure Python too) maps them. Pools take contiguous runs of bins, so a pool
serving several bins still batches requests of similar lengths together (Multi-Bin batching degrades
gracefully when there are fewer replicas than bins).
"""

from __future__ import annotations

import collections
from array import array
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster.config import ReplicaRouting
from cluster.predictor.lengths import bin_of
from pipeline.block_manager import BlockName
from pipeline.request import NewRequest


@dataclass(frozen=True)
class Route:
    """Where one request goes."""

    bin_id: int
    pool_id: int


def pools_for_bins(num_bins: int, num_pools: int) -> tuple[int, ...]:
    """The pool of each bin: contiguous runs of bins, pool sizes differing by at most one bin.

    ``floor(b * P / B)`` is non-decreasing in ``b`` and takes every value in ``0 .. P-1`` when ``P <= B``,
    so every pool gets at least one bin.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins: must be at least 1, got {num_bins}")
    if not 1 <= num_pools <= num_bins:
        raise ValueError(f"num_pools: must be in [1, {num_bins}] (num_bins), got {num_pools}")
    return tuple(b * num_pools // num_bins for b in range(num_bins))


@dataclass(frozen=True)
class BinRouter:
    bin_boundaries: tuple[int, ...]
    """Inclusive upper edges, in output tokens, of bins ``0 .. num_bins - 2``; non-decreasing."""
    pool_of_bin: tuple[int, ...]
    """The engine pool serving each bin."""
    stay_min_cached_tokens: int | None = None
    """A request stays in another pool than its bin's when that pool holds at least this many more tokens
    of its prompt's prefix than its bin's pool does (``route``); None: always its bin's pool."""
    stay_max_bin_distance: int = 1
    """... if its bin is at most this many bins from one that pool serves."""

    def __post_init__(self) -> None:
        edges = self.bin_boundaries
        if any(not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in edges):
            raise ValueError(f"bin_boundaries: must be non-negative integers, got {list(edges)}")
        if any(b < a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"bin_boundaries: must be non-decreasing, got {list(edges)}")
        if len(self.pool_of_bin) != self.num_bins:
            raise ValueError(
                f"pool_of_bin: must name one pool per bin ({self.num_bins}), got {len(self.pool_of_bin)}"
            )
        pools = sorted(set(self.pool_of_bin))
        if pools != list(range(len(pools))):
            raise ValueError(f"pool_of_bin: pools must be numbered 0 .. n-1 with none unused, got {pools}")

    @classmethod
    def build(
        cls,
        bin_boundaries: Sequence[int],
        num_pools: int | None = None,
        stay_min_cached_tokens: int | None = None,
        stay_max_bin_distance: int = 1,
    ) -> BinRouter:
        """A router over ``len(bin_boundaries) + 1`` bins on ``num_pools`` pools (default: one per bin)."""
        num_bins = len(bin_boundaries) + 1
        pool_of_bin = pools_for_bins(num_bins, num_pools or num_bins)
        return cls(tuple(bin_boundaries), pool_of_bin, stay_min_cached_tokens, stay_max_bin_distance)

    @property
    def num_bins(self) -> int:
        return len(self.bin_boundaries) + 1

    @property
    def num_pools(self) -> int:
        return max(self.pool_of_bin) + 1

    def bin_of(self, predicted_output_tokens: int) -> int:
        """The bin holding a predicted length: the number of boundaries strictly below it."""
        return bin_of(predicted_output_tokens, self.bin_boundaries)

    def route(self, predicted_output_tokens: int, held: Mapping[int, int] | None = None) -> Route:
        """The bin of the predicted length and its pool; or, when ``held`` (the prompt's cached prefix in
        tokens, by pool) says another pool holds at least ``stay_min_cached_tokens`` more of it than the
        bin's pool and the bin is near one that pool serves (``stay_max_bin_distance``), that pool (the
        one holding most, if several): the turns of one conversation, predicted into neighbouring bins,
        keep their history's KV instead of prefilling it again elsewhere. A prefix both pools hold (a
        shared system prompt) does not count: moving would not recompute it."""
        if predicted_output_tokens < 0:
            raise ValueError(f"predicted_output_tokens: must be >= 0, got {predicted_output_tokens}")
        bin_id = self.bin_of(predicted_output_tokens)
        pool_id = self.pool_of_bin[bin_id]
        if held and self.stay_min_cached_tokens is not None:
            own = held.get(pool_id, 0)
            near = [
                (tokens, other)
                for other, tokens in held.items()
                if other != pool_id
                and tokens - own >= self.stay_min_cached_tokens
                and min(abs(bin_id - b) for b, p in enumerate(self.pool_of_bin) if p == other)
                <= self.stay_max_bin_distance
            ]
            if near:
                pool_id = max(near)[1]
        return Route(bin_id=bin_id, pool_id=pool_id)


@dataclass
class PrefixPools:
    """Which pools this ingress sent each prompt block to, by block name (least recently sent dropped first
    beyond ``capacity``): where a conversation's history is likely cached. A guess, as Ray Serve LLM's
    prefix tree is: a pool may have evicted the blocks since."""

    capacity: int = 65_536
    _pools_of_name: collections.OrderedDict[BlockName, int] = field(default_factory=collections.OrderedDict)
    """Per name, a bit per pool it was sent to."""

    def record(self, block_names: Sequence[BlockName], pool_id: int) -> None:
        for name in block_names:
            self._pools_of_name[name] = self._pools_of_name.get(name, 0) | 1 << pool_id
            self._pools_of_name.move_to_end(name)
        while len(self._pools_of_name) > self.capacity:
            self._pools_of_name.popitem(last=False)

    def held(self, block_names: Sequence[BlockName], block_size: int) -> dict[int, int]:
        """Per pool sent any of these blocks, the tokens of the longest prefix of them it was sent (names
        are chained: a name sent stands for its whole prefix)."""
        held: dict[int, int] = {}
        for i in range(len(block_names) - 1, -1, -1):
            pools = self._pools_of_name.get(block_names[i], 0)
            while pools:
                pool_id = (pools & -pools).bit_length() - 1
                held.setdefault(pool_id, (i + 1) * block_size)
                pools &= pools - 1
        return held


MAX_REPORTED_BLOCKS = 8192
"""Most cached block names one routing report carries (64 KiB): those in use, then the most recently freed."""


def encode_block_names(names: Sequence[BlockName]) -> bytes:
    """A replica's cached block names as its routing report carries them: 8 bytes a name."""
    return array("q", names).tobytes()


def decode_block_names(data: bytes) -> frozenset[BlockName]:
    return frozenset(array("q", data))


@dataclass
class PredictedWorkBook:
    """One router's view of each replica's outstanding requests, as their predicted work: tokens still to
    prefill plus output tokens still to generate, their mean under the request's predicted length
    distribution where it has one (``Request.expected_work_tokens``), and of the prompt blocks each replica
    holds in its prefix cache.

    A new request of predicted work ``x`` goes to the replica where ``sum(min(w, x))`` over its outstanding
    requests' work ``w`` is least. Decoding shares each step among the running requests, so that sum is the
    delay the new request meets and, symmetrically, the delay it adds to the others before they finish: for
    a short request it is about ``x`` times the queue length (join the shortest queue), for a long one the
    total work (least work left). Counting total work for every request instead sends short requests to a
    replica with a few long ones and many requests, which costs mean latency when predictions are noisy.

    Replicas report every few hundred milliseconds, so a report is stale by the requests routed since. The
    book adds each request it routes to its replica (``add``: when the router picks the replica, and again
    when the replica accepts it) until a report made after the routing (which then counts the request
    itself) or the request's completion; so a burst routed between two reports spreads instead of following
    one stale report. The routed requests' prompt blocks count as cached there from then on (their prefill
    will cache them) until a report made after the routing says what the replica holds. Reports and
    routings carry wall-clock times of different processes: on one host they agree; across hosts the skew
    (milliseconds under NTP) only shifts which report first counts a request.
    """

    block_size: int = 16
    """Tokens per KV block of the pool's engines (``cache.block_size``): turns cached blocks into tokens."""
    reported: dict[Hashable, tuple[int, ...]] = field(default_factory=dict)
    """Per replica: the predicted work of each outstanding request, as last reported."""
    reported_at_s: dict[Hashable, float] = field(default_factory=dict)
    cached: dict[Hashable, frozenset[BlockName]] = field(default_factory=dict)
    """Per replica: the names of its cached blocks, as last reported."""
    routed: dict[Hashable, dict[Hashable, tuple[int, float]]] = field(default_factory=dict)
    """Per replica: requests this router sent there that no report counts yet, as (work, routed at)."""
    routed_names: dict[Hashable, dict[Hashable, tuple[tuple[BlockName, ...], float]]] = field(
        default_factory=dict
    )
    """Per replica: prompt block names of requests sent there since its report, as (names, routed at)."""

    def report(
        self,
        replica_id: Hashable,
        work_tokens: Sequence[int],
        reported_at_s: float,
        cached_names: Collection[BlockName] = frozenset(),
    ) -> None:
        if reported_at_s <= self.reported_at_s.get(replica_id, float("-inf")):
            return  # the same report again (or an older one)
        self.reported[replica_id] = tuple(work_tokens)
        self.reported_at_s[replica_id] = reported_at_s
        self.cached[replica_id] = frozenset(cached_names)
        for book in (self.routed, self.routed_names):
            pending = book.get(replica_id, {})
            for request_id in [r for r, (_, routed_at_s) in pending.items() if routed_at_s <= reported_at_s]:
                del pending[request_id]

    def add(
        self,
        replica_id: Hashable,
        request_id: Hashable,
        work_tokens: int,
        routed_at_s: float,
        block_names: Sequence[BlockName] = (),
    ) -> None:
        """Count a request at the replica it was sent to (it moves there if it was counted elsewhere)."""
        for book in (self.routed, self.routed_names):
            for pending in book.values():
                pending.pop(request_id, None)
        self.routed.setdefault(replica_id, {})[request_id] = (work_tokens, routed_at_s)
        if block_names:
            self.routed_names.setdefault(replica_id, {})[request_id] = (tuple(block_names), routed_at_s)

    def complete(self, replica_id: Hashable, request_id: Hashable) -> None:
        self.routed.get(replica_id, {}).pop(request_id, None)

    def forget_all_but(self, replica_ids: Sequence[Hashable]) -> None:
        """Drop replicas that left the pool."""
        keep = set(replica_ids)
        for book in (self.reported, self.reported_at_s, self.cached, self.routed, self.routed_names):
            for replica_id in [r for r in book if r not in keep]:
                del book[replica_id]

    def outstanding(self, replica_id: Hashable) -> list[int]:
        """The predicted work of each request the replica holds, as far as this router knows."""
        pending = self.routed.get(replica_id, {}).values()
        return [*self.reported.get(replica_id, ()), *(work for work, _ in pending)]

    def delay_tokens(self, replica_id: Hashable, work_tokens: int) -> int:
        """``sum(min(w, work_tokens))`` over the replica's outstanding requests (see the class)."""
        return sum(min(w, work_tokens) for w in self.outstanding(replica_id))

    def ranked(self, replica_ids: Sequence[Hashable], work_tokens: int) -> list[Hashable]:
        """``replica_ids`` from the least delay for a request of ``work_tokens`` to the most; ties keep the
        given order (callers shuffle it, so that routers with equal views do not all pick one idle replica)."""
        return sorted(replica_ids, key=lambda r: self.delay_tokens(r, work_tokens))

    def num_cached_blocks(self, replica_id: Hashable, block_names: Sequence[BlockName]) -> int:
        """How many leading blocks of ``block_names`` the replica holds, as far as this router knows. Names
        are chained, so a name found means its whole prefix is there."""
        reported = self.cached.get(replica_id, frozenset())
        routed = [set(names) for names, _ in self.routed_names.get(replica_id, {}).values()]
        n = 0
        for name in block_names:
            if name not in reported and not any(name in names for names in routed):
                break
            n += 1
        return n

    def num_cached_tokens(self, replica_id: Hashable, new: NewRequest) -> int:
        """Prompt tokens of ``new`` the replica would find cached (at least one is always computed)."""
        cached = self.num_cached_blocks(replica_id, new.prompt_block_names) * self.block_size
        return min(cached, len(new.prompt_token_ids) - 1)

    def num_known_blocks(self, replica_id: Hashable) -> int:
        """Blocks the replica holds as far as this router knows: the size of its cache, for Ray's rule."""
        routed = self.routed_names.get(replica_id, {}).values()
        return len(self.cached.get(replica_id, ())) + sum(len(names) for names, _ in routed)


# ---- rules: each ranks a pool's replicas for one request, best first ---------------------------------


def least_predicted_work(book: PredictedWorkBook, replica_ids: Sequence[Hashable], new: NewRequest) -> list:
    """The least ``sum(min(w, x))`` for the request's predicted work ``x`` (cache-blind)."""
    return book.ranked(replica_ids, new.expected_work_tokens)


def least_cost(book: PredictedWorkBook, replica_ids: Sequence[Hashable], new: NewRequest) -> list:
    """The least cost: the prefill the replica would still compute (prompt tokens it does not hold cached)
    plus the predicted work the request would wait behind there, ``sum(min(w, x))`` with ``x`` its own
    work at that replica (uncached prefill plus predicted output). Both in tokens of the one definition of
    predicted service, so a long cached prefix outweighs a slightly longer queue and not a much longer one.
    Equal costs (a new conversation while the replicas are idle, as between turns) go to the smaller cache,
    as in ``prefix_affinity``: the histories a replica holds are the follow-up turns it will be sent, so
    conversations spread evenly instead of at random."""

    def cost(replica_id: Hashable) -> tuple[int, int]:
        uncached = len(new.prompt_token_ids) - book.num_cached_tokens(replica_id, new)
        work = new.expected_work_tokens - len(new.prompt_token_ids) + uncached
        return uncached + book.delay_tokens(replica_id, work), book.num_known_blocks(replica_id)

    return sorted(replica_ids, key=cost)


IMBALANCED_REQUESTS = 10
"""Ray Serve LLM's ``PrefixCacheAffinityRouter`` default ``imbalanced_threshold``: outstanding requests
between the busiest and the idlest replica beyond which it balances load instead of following prefixes."""
MATCH_RATE = 0.1
"""Its ``match_rate_threshold``: the least share of the prompt a replica must hold to be preferred."""


def prefix_affinity(book: PredictedWorkBook, replica_ids: Sequence[Hashable], new: NewRequest) -> list:
    """Ray Serve LLM's ``PrefixCacheAffinityRouter`` rule (cache-aware, length-blind): when the replicas'
    outstanding requests differ by more than ``IMBALANCED_REQUESTS``, the least loaded; else the replicas
    holding the longest cached prefix if it covers at least ``MATCH_RATE`` of the prompt, else those with
    the smallest caches; among equals, and for the rest of the ranking, the least loaded."""
    load = {r: len(book.outstanding(r)) for r in replica_ids}
    by_load = sorted(replica_ids, key=load.__getitem__)
    if not by_load or load[by_load[-1]] - load[by_load[0]] > IMBALANCED_REQUESTS:
        return by_load
    cached = {r: book.num_cached_tokens(r, new) for r in by_load}
    best = max(cached.values())
    if best >= MATCH_RATE * len(new.prompt_token_ids) and best > 0:
        first = [r for r in by_load if cached[r] == best]
    else:
        size = {r: book.num_known_blocks(r) for r in by_load}
        first = [r for r in by_load if size[r] == min(size.values())]
    return first + [r for r in by_load if r not in first]


Rule = Callable[[PredictedWorkBook, Sequence[Hashable], NewRequest], list]
RULES: dict[ReplicaRouting, Rule] = {
    ReplicaRouting.LEAST_PREDICTED_WORK: least_predicted_work,
    ReplicaRouting.LEAST_COST: least_cost,
    ReplicaRouting.PREFIX_AFFINITY: prefix_affinity,
}
"""The rules a pool's router runs by ``pools.replica_routing`` (Serve's ``BookRouter`` and the simulator);
``power_of_two`` is Serve's own router."""
