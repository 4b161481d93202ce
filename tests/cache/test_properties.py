"""Property tests: random interleavings never leak, double-free or corrupt a cached prefix; the radix tree agrees
with brute force."""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yaie_jax.cache import BlockManager

BS = 2


class Shadow:
    """What each GPU block should hold: block -> tuple of token ids written at its slots."""

    def __init__(self):
        self.content = {}

    def write(self, slots, toks):
        for s, t in zip(slots, toks):
            b, off = divmod(s, BS)
            c = list(self.content.get(b, ()))
            c = (c + [None] * BS)[:BS]
            c[off] = t
            self.content[b] = tuple(c)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 10 ** 6)), min_size=1, max_size=80),
       st.booleans(), st.integers(0, 6))
def test_random_interleavings(ops, caching, cpu_blocks):
    bm = BlockManager(num_gpu_blocks=10, block_size=BS, num_cpu_blocks=cpu_blocks, enable_prefix_caching=caching)
    shadow = Shadow()
    seqs = {}          # id -> token list (all tokens whose slots exist are "written")
    written = {}       # id -> number of tokens written
    next_id = 0
    for op, r in ops:
        rng = random.Random(r)
        live = [s for s in seqs if not bm.is_swapped(s)]
        swapped = [s for s in seqs if bm.is_swapped(s)]
        if op == 0 or not seqs:                                   # add
            toks = [rng.randint(0, 3) for _ in range(rng.randint(1, 7))]
            sid = next_id
            next_id += 1
            cached = bm.add_sequence(sid, toks)
            assert cached % BS == 0 and cached < len(toks)
            for i in range(cached // BS):                          # cached blocks hold exactly these tokens
                b = bm.get_block_table(sid)[i]
                assert shadow.content[b] == tuple(toks[i * BS:(i + 1) * BS])
            seqs[sid] = toks
            written[sid] = cached
        elif op == 1 and live:                                    # append (prefill rest or decode one)
            sid = rng.choice(live)
            n = max(1, len(seqs[sid]) - written[sid])
            if written[sid] + n > len(seqs[sid]):
                seqs[sid].append(rng.randint(0, 3))
            if bm.can_append_slots(sid, n):
                slots, copies = bm.append_slots(sid, n)
                for src, dst in copies:
                    shadow.content[dst] = shadow.content.get(src)
                shadow.write(slots, seqs[sid][written[sid]:written[sid] + n])
                written[sid] += n
        elif op == 2 and live:                                    # fork
            sid = rng.choice(live)
            bm.fork(sid, next_id)
            seqs[next_id] = list(seqs[sid])
            written[next_id] = written[sid]
            next_id += 1
        elif op == 3 and live:                                    # cache (finish keeps going)
            sid = rng.choice(live)
            bm.cache_sequence(sid, seqs[sid][:written[sid]])
        elif op in (4, 5) and seqs:                               # finish (with caching) / abort
            sid = rng.choice(list(seqs))
            if op == 4 and not bm.is_swapped(sid):
                bm.cache_sequence(sid, seqs[sid][:written[sid]])
            bm.free_sequence(sid)
            del seqs[sid], written[sid]
        elif op == 6 and live:                                    # swap out
            sid = rng.choice(live)
            if bm.can_swap_out(sid):
                pairs = bm.swap_out(sid)
                seqs[sid] = (seqs[sid], {c: shadow.content.get(g) for g, c in pairs})
        elif op == 7 and swapped:                                 # swap in
            sid = rng.choice(swapped)
            if bm.can_swap_in(sid):
                toks, host = seqs[sid]
                for c, g in bm.swap_in(sid):
                    shadow.content[g] = host[c]
                seqs[sid] = toks
        # the swapped seqs keep a (tokens, host) tuple: normalise for the checks below
        bm.check_invariants()
        for sid, toks in list(seqs.items()):
            if isinstance(toks, tuple) or bm.is_swapped(sid):
                continue
            table = bm.get_block_table(sid)
            for i in range(written[sid] // BS):                    # every full written block holds its tokens
                assert shadow.content[table[i]] == tuple(toks[i * BS:(i + 1) * BS])
        # cached prefixes are intact
        stack = [(bm.tree.root, [])]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                assert shadow.content[child.block] == child.key
                stack.append((child, prefix + list(child.key)))
    for sid in list(seqs):
        bm.free_sequence(sid)
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.num_free_gpu_blocks == 10 and bm.num_free_cpu_blocks == cpu_blocks


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=12), min_size=1, max_size=12),
       st.lists(st.integers(0, 2), min_size=0, max_size=14))
def test_radix_match_equals_brute_force(inserted, query):
    bm = BlockManager(num_gpu_blocks=200, block_size=BS)
    for i, toks in enumerate(inserted):
        bm.add_sequence(i, toks + [0])
        bm.append_slots(i, len(toks) + 1 - bm.num_tokens(i))
        bm.cache_sequence(i, toks)
        bm.free_sequence(i)
    got = bm.tree.match(query)
    # brute force: the longest block-aligned common prefix with any inserted sequence
    best = 0
    for toks in inserted:
        n = 0
        while n + BS <= min(len(toks), len(query)) and toks[n:n + BS] == query[n:n + BS]:
            n += BS
        best = max(best, n)
    assert len(got) * BS == best
    bm.check_invariants()
