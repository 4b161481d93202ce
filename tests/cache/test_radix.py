"""The radix tree against brute force: longest cached prefix, the tree's blocks, and the LRU eviction order."""
from hypothesis import example, given, settings
from hypothesis import strategies as st

from yaie_jax.cache import BlockManager, BlockPool, RadixCache

token_lists = st.lists(st.integers(0, 2), min_size=0, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(token_lists, min_size=1, max_size=12), st.lists(token_lists, min_size=1, max_size=8),
       st.integers(1, 3))
def test_match_equals_brute_force_longest_common_prefix(inserted, queries, bs):
    """Insert random token lists through the BlockManager; every query's hit is the longest block-aligned common
    prefix with any inserted list (leaving the query's last token uncached), found by brute force."""
    bm = BlockManager(num_gpu_blocks=200, block_size=bs)
    for i, toks in enumerate(inserted):
        bm.add_sequence(i, toks + [0])
        bm.append_slots(i, len(toks) + 1 - bm.num_tokens(i))
        bm.cache_sequence(i, toks)
        bm.free_sequence(i)
    for q in queries:
        got = bm.tree.match(q)
        best = 0
        for toks in inserted:                      # brute force
            n = 0
            while n + bs <= min(len(toks), len(q)) and toks[n:n + bs] == q[n:n + bs]:
                n += bs
            best = max(best, n)
        assert len(got) * bs == best
        hit = bm.add_sequence(("q", tuple(q)), q) if ("q", tuple(q)) not in bm.seqs else None
        if hit is not None:
            assert hit == min(best, (max(0, len(q) - 1) // bs) * bs)
            bm.free_sequence(("q", tuple(q)))
    bm.check_invariants()


class Model:
    """Brute-force cache: {prefix tuple: [block, last touch time]}, every cached prefix stored whole."""

    def __init__(self, bs):
        self.bs = bs
        self.entries = {}
        self.time = 0
        self.held = []          # paths (lists of prefixes) some holder keeps referenced

    def match(self, q):
        self.time += 1
        out = []
        k = self.bs
        while k <= len(q) and tuple(q[:k]) in self.entries:
            e = self.entries[tuple(q[:k])]
            e[1] = self.time
            out.append(e[0])
            k += self.bs
        return out

    def lru_victim(self):
        locked = {p[:k] for path in self.held for p in path for k in range(self.bs, len(p) + 1, self.bs)}
        leaves = [p for p in self.entries if p not in locked
                  and not any(len(o) == len(p) + self.bs and o[:len(p)] == p for o in self.entries)]
        return min(leaves, key=lambda p: self.entries[p][1]) if leaves else None


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3),
       st.lists(st.tuples(st.sampled_from(["insert", "insert", "match", "evict", "hold", "release"]),
                          token_lists, st.integers(0, 100)), min_size=1, max_size=40))
# a touched leaf must move behind a newer one (its old heap entry is stale)
@example(bs=1, ops=[("insert", [0, 1], 0), ("insert", [2], 0), ("match", [0, 1], 0), ("evict", [], 2)])
# a held path's parent becomes evictable only after its child went
@example(bs=2, ops=[("insert", [0, 0, 1, 1], 0), ("hold", [0, 0, 1, 1], 0), ("insert", [2, 2], 0),
                    ("evict", [], 3), ("release", [], 0), ("evict", [], 3)])
def test_radix_cache_against_brute_force_model(bs, ops):
    """Random inserts (new and overlapping), matches, holds/releases and evictions on a bare RadixCache: the
    returned blocks, the tree's contents and the order of evictions (least recently used unlocked leaf first)
    equal a brute-force model."""
    pool = BlockPool(400)
    tree = RadixCache(pool, bs)
    model = Model(bs)
    holds = []              # (blocks held, prefixes) per holder
    for op, toks, r in ops:
        n = len(toks) // bs
        if op == "insert":
            mine = [pool.allocate() for _ in range(n)]
            canon = tree.insert(toks, mine)
            model.time += 1
            want = []
            for i in range(n):
                p = tuple(toks[:(i + 1) * bs])
                if p not in model.entries:
                    model.entries[p] = [mine[i], 0]
                model.entries[p][1] = model.time
                want.append(model.entries[p][0])
            assert canon == want
            for b in mine:                         # drop our references: new nodes stay, duplicates are freed
                tree.release(b)
        elif op == "match":
            assert tree.match(toks) == model.match(toks)
        elif op == "hold":                         # a holder takes a cached path, the way add_sequence does
            blocks = tree.match(toks)
            assert blocks == model.match(toks)
            for b in blocks:
                tree.acquire(b)
            holds.append(blocks)
            model.held.append([tuple(toks[:(i + 1) * bs]) for i in range(len(blocks))])
        elif op == "release" and holds:
            i = r % len(holds)
            for b in reversed(holds.pop(i)):
                tree.release(b)
            model.held.pop(i)
        elif op == "evict":
            for _ in range(r % 4 + 1):
                victim = model.lru_victim()
                got = tree.evict(1)
                if victim is None:
                    assert got == []
                    break
                assert got == [model.entries.pop(victim)[0]]
        # the tree holds exactly the model's prefixes, with the model's blocks
        assert {p: node.block for node, p in tree.walk()} == {p: e[0] for p, e in model.entries.items()}
        tree.check_invariants()
    for blocks in holds:
        for b in reversed(blocks):
            tree.release(b)
    tree.reset()
    assert len(tree) == 0 and pool.num_free == 400
