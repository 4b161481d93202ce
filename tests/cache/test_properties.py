"""Property tests: random interleavings of add / append / fork / cache / finish / abort / evict / reset / swap-out /
swap-in over a small pool, checked against an independent shadow model of what every block holds.

The shadow model writes each sequence's token ids into the blocks at the slots `append_slots` returns, and
replays the returned copy-on-write and swap copies. After every step it checks, from public views only:
- every position a sequence has a slot for holds that sequence's token (so nobody ever wrote a block someone
  else was reading, and copies went the right way), on the device or, while swapped, on the host;
- every cached node's block holds the node's tokens, and a sequence holding a cached block has the node's
  whole prefix (cached prefixes stay intact);
- reference counts equal holders (block tables + tree nodes), the free lists are exactly the unheld blocks,
  the evictable count equals a brute-force count of cached subtrees nobody holds;
- a failing check-then-act call raises and changes nothing;
and at the end, with every sequence finished and the cache reset, every block is free.
"""
import collections
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from yaie_jax.cache import BlockManager, OutOfBlocksError

BS = 2
VOCAB = 3          # few distinct tokens, so prompts share prefixes often
BASES = [[0, 1, 2, 0, 1, 2, 0, 1, 2], [0, 1, 1, 1, 2, 2, 2], [2, 2, 2, 2, 2, 2, 2, 2]]
prompts = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=9),
    st.builds(lambda k, m, tail: BASES[k][:m] + tail, st.integers(0, len(BASES) - 1), st.integers(0, 9),
              st.lists(st.integers(0, VOCAB - 1), max_size=3)).filter(len))


def state(bm):
    return ({sid: (list(s.blocks), s.num_tokens, list(s.cpu_blocks), s.swapped) for sid, s in bm.seqs.items()},
            list(bm.pool.refcount), list(bm.pool.free), list(bm.host.refcount), list(bm.host.free),
            sorted(bm.tree.nodes), bm.get_stats())


class CacheMachine(RuleBasedStateMachine):
    @initialize(num_gpu=st.integers(4, 12), num_cpu=st.integers(0, 8), caching=st.booleans())
    def setup(self, num_gpu, num_cpu, caching):
        self.bm = BlockManager(num_gpu_blocks=num_gpu, block_size=BS, num_cpu_blocks=num_cpu,
                               enable_prefix_caching=caching)
        self.gpu = {}      # block -> [token or None] * BS, what the device block holds
        self.host = {}     # host block -> same
        self.tokens = {}   # seq id -> its tokens (prompt, then "sampled" ones)
        self.next_id = 0

    # ------------------------------------------------------------------ helpers
    def pick(self, i, swapped=None):
        ids = sorted(sid for sid in self.tokens if swapped is None or self.bm.is_swapped(sid) == swapped)
        return ids[i % len(ids)] if ids else None

    def write(self, slots, toks):
        for slot, tok in zip(slots, toks):
            b, off = divmod(slot, BS)
            self.gpu.setdefault(b, [None] * BS)[off] = tok

    # ------------------------------------------------------------------ rules
    @rule(prompt=prompts, prefill=st.booleans(), cache=st.booleans())
    def add(self, prompt, prefill, cache):
        """Admission; with `prefill`, the engine's usual next steps: compute the prompt, cache what's written."""
        sid = self._add(prompt)
        if prefill:
            left = len(prompt) - self.bm.num_tokens(sid)
            if self.bm.can_append_slots(sid, left):
                self._append(sid, left, 0, False)
                if cache:
                    self._cache(sid, 0)

    def _add(self, prompt):
        sid = self.next_id
        self.next_id += 1
        prefixes = {p for _, p in self.bm.tree.walk()}
        cached = self.bm.add_sequence(sid, prompt)
        # brute force: the longest block-aligned prefix of prompt[:-1] that the tree holds
        want = 0
        if self.bm.enable_prefix_caching:
            while want + BS <= len(prompt) - 1 and tuple(prompt[:want + BS]) in prefixes:
                want += BS
        assert cached == want
        assert self.bm.num_tokens(sid) == cached and len(self.bm.get_block_table(sid)) == cached // BS
        self.tokens[sid] = list(prompt)
        return sid

    @rule(i=st.integers(0, 50), n=st.integers(1, 7), new_tok=st.integers(0, VOCAB - 1), force=st.booleans())
    def append(self, i, n, new_tok, force):
        sid = self.pick(i, swapped=False)
        if sid is not None:
            self._append(sid, n, new_tok, force)

    def _append(self, sid, n, new_tok, force):
        bm = self.bm
        nt = bm.num_tokens(sid)
        left = len(self.tokens[sid]) - nt
        n = min(n, left) if left > 0 else 1          # a prefill chunk, or one decode token
        ok = bm.can_append_slots(sid, n)
        if not ok:
            if force:                                 # must raise and change nothing
                before = state(bm)
                try:
                    bm.append_slots(sid, n)
                except OutOfBlocksError:
                    pass
                else:
                    raise AssertionError("append_slots succeeded although can_append_slots said no")
                assert state(bm) == before
            return
        slots, copies = bm.append_slots(sid, n)
        if left <= 0:
            self.tokens[sid].append(new_tok)
        assert len(slots) == n and len(set(slots)) == n
        table = bm.get_block_table(sid)
        for k, slot in enumerate(slots):              # slots are exactly the next positions in the table
            assert slot == table[(nt + k) // BS] * BS + (nt + k) % BS
            assert bm.pool.refcount[slot // BS] == 1, "writing into a block someone else holds"
        for src, dst in copies:
            self.gpu[dst] = list(self.gpu[src])
        self.write(slots, self.tokens[sid][nt:nt + n])

    @rule(i=st.integers(0, 50))
    def fork(self, i):
        sid = self.pick(i)
        if sid is None:
            return
        child = self.next_id
        self.next_id += 1
        self.bm.fork(sid, child)
        self.tokens[child] = list(self.tokens[sid])

    @rule(i=st.integers(0, 50), short=st.integers(0, 3))
    def cache(self, i, short):
        sid = self.pick(i, swapped=False)
        if sid is not None:
            self._cache(sid, short)

    def _cache(self, sid, short):
        written = self.bm.num_tokens(sid)
        self.bm.cache_sequence(sid, self.tokens[sid][:max(0, written - short)])

    @rule(i=st.integers(0, 50), cache_first=st.booleans())
    def finish(self, i, cache_first):             # finish (cache, then free) or abort (free)
        sid = self.pick(i)
        if sid is None:
            return
        if cache_first and not self.bm.is_swapped(sid):
            self.bm.cache_sequence(sid, self.tokens[sid][:self.bm.num_tokens(sid)])
        self.bm.free_sequence(sid)
        del self.tokens[sid]

    @rule(n=st.integers(1, 4))
    def evict(self, n):
        bm = self.bm
        evictable = bm.num_evictable_gpu_blocks
        free = bm.num_free_gpu_blocks
        out = bm.evict_cached_blocks(n)
        assert len(out) == min(n, evictable)
        assert bm.num_free_gpu_blocks == free + len(out)
        assert not set(out) & set(bm.tree.nodes)

    @rule()
    def reset(self):
        bm = self.bm
        free, evictable = bm.num_free_gpu_blocks, bm.num_evictable_gpu_blocks
        bm.reset_prefix_cache()
        assert bm.num_free_gpu_blocks == free + evictable and bm.num_evictable_gpu_blocks == 0

    @rule(i=st.integers(0, 50), force=st.booleans())
    def swap_out(self, i, force):
        sid = self.pick(i, swapped=False)
        if sid is None:
            return
        bm = self.bm
        if not bm.can_swap_out(sid):
            if force:
                before = state(bm)
                try:
                    bm.swap_out(sid)
                except OutOfBlocksError:
                    pass
                else:
                    raise AssertionError("swap_out succeeded although can_swap_out said no")
                assert state(bm) == before
            return
        table = list(bm.get_block_table(sid))
        pairs = bm.swap_out(sid)
        assert len({c for _, c in pairs}) == len(pairs) and {g for g, _ in pairs} <= set(table)
        for g, c in pairs:
            self.host[c] = list(self.gpu[g])
        assert len(bm.get_cpu_block_table(sid)) == len(table)

    @rule(i=st.integers(0, 50), force=st.booleans())
    def swap_in(self, i, force):
        sid = self.pick(i, swapped=True)
        if sid is None:
            return
        bm = self.bm
        if not bm.can_swap_in(sid):
            if force:
                before = state(bm)
                try:
                    bm.swap_in(sid)
                except OutOfBlocksError:
                    pass
                else:
                    raise AssertionError("swap_in succeeded although can_swap_in said no")
                assert state(bm) == before
            return
        pairs = bm.swap_in(sid)
        assert len({g for _, g in pairs}) == len(pairs)
        for c, g in pairs:
            self.gpu[g] = list(self.host[c])

    # ------------------------------------------------------------------ checks
    @invariant()
    def contents_and_counts(self):
        if not hasattr(self, "bm"):
            return
        bm = self.bm
        bm.check_invariants()
        holders = collections.Counter()
        node_prefix = {}
        for node, prefix in bm.tree.walk():                 # cached prefixes are intact
            assert self.gpu[node.block] == list(node.key), (node.block, self.gpu[node.block], node.key)
            node_prefix[node.block] = prefix
            holders[node.block] += 1
        for sid, toks in self.tokens.items():
            nt = bm.num_tokens(sid)
            assert nt <= len(toks)
            if bm.is_swapped(sid):
                table, content = bm.get_cpu_block_table(sid), self.host
            else:
                table, content = bm.get_block_table(sid), self.gpu
                for j, b in enumerate(table):
                    holders[b] += 1
                    if b in node_prefix:
                        assert node_prefix[b] == tuple(toks[:(j + 1) * BS]), "holds a cached block of another prefix"
            assert len(table) == -(-nt // BS)
            for p in range(nt):
                assert content[table[p // BS]][p % BS] == toks[p], (sid, p)
        for b in range(bm.num_gpu_blocks):
            assert bm.pool.refcount[b] == holders[b]
        assert bm.num_free_gpu_blocks == sum(1 for b in range(bm.num_gpu_blocks) if holders[b] == 0)

        # brute force: a cached block is evictable iff nobody but the tree holds it or anything below it
        def unheld(node):
            kids = [unheld(c) for c in node.children.values()]   # no short-circuit: count every subtree
            free_here = bm.pool.refcount[node.block] == 1 and all(k[0] for k in kids)
            return free_here, sum(k[1] for k in kids) + free_here

        assert bm.num_evictable_gpu_blocks == sum(unheld(c)[1] for c in bm.tree.root.children.values())

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        bm = self.bm
        for sid in list(self.tokens):
            bm.free_sequence(sid)
        bm.reset_prefix_cache()
        bm.check_invariants()
        assert bm.num_free_gpu_blocks == bm.num_gpu_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks
        assert len(bm.tree) == 0


def random_prompt(rnd):
    if rnd.random() < 0.5:
        return [rnd.randrange(VOCAB) for _ in range(rnd.randint(1, 9))]
    p = rnd.choice(BASES)[:rnd.randint(0, 9)] + [rnd.randrange(VOCAB) for _ in range(rnd.randint(0, 3))]
    return p or [0]


# (rule, weight, argument maker): long engine-like runs, heavier on appends and swaps than a uniform pick
WALK = [
    (CacheMachine.add, 4, lambda r: dict(prompt=random_prompt(r), prefill=r.random() < 0.7, cache=r.random() < 0.5)),
    (CacheMachine.append, 12, lambda r: dict(i=r.randrange(50), n=r.randint(1, 7), new_tok=r.randrange(VOCAB),
                                             force=r.random() < 0.3)),
    (CacheMachine.fork, 4, lambda r: dict(i=r.randrange(50))),
    (CacheMachine.cache, 2, lambda r: dict(i=r.randrange(50), short=r.randint(0, 3))),
    (CacheMachine.finish, 5, lambda r: dict(i=r.randrange(50), cache_first=r.random() < 0.7)),
    (CacheMachine.evict, 1, lambda r: dict(n=r.randint(1, 4))),
    (CacheMachine.reset, 0.3, lambda r: {}),
    (CacheMachine.swap_out, 4, lambda r: dict(i=r.randrange(50), force=r.random() < 0.3)),
    (CacheMachine.swap_in, 3, lambda r: dict(i=r.randrange(50), force=r.random() < 0.3)),
]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(4, 12), st.integers(0, 8), st.booleans())
def test_long_random_walks(seed, num_gpu, num_cpu, caching):
    """The same rules and checks as the state machine, in 200-step runs with engine-like weights, so that deep
    states (full pools, evictions under pressure, swapped forks, cached twins) are reached often."""
    rnd = random.Random(seed)
    m = CacheMachine()
    m.setup(num_gpu=num_gpu, num_cpu=num_cpu, caching=caching)
    rules = [w[0] for w in WALK]
    weights = [w[1] for w in WALK]
    makers = {w[0]: w[2] for w in WALK}
    for _ in range(200):
        fn = rnd.choices(rules, weights)[0]
        fn(m, **makers[fn](rnd))
        m.contents_and_counts()
    m.teardown()


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestCacheMachine = CacheMachine.TestCase
