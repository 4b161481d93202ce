"""Brute-force numpy (float64) attention over paged K/V, independent of pallas_kernels, for the tests."""
import numpy as np


def seq_kv(pages, block_table, n):
    # pages [H, NB, BS, D] -> [H, n, D] the first n tokens of a sequence
    H, NB, BS, D = pages.shape
    idx = np.arange(n)
    return pages[:, block_table[idx // BS], idx % BS]


def attend(qv, k, v, scale):
    # qv [Hq, D], k/v [Hkv, n, D] -> [Hq, D]
    Hq = qv.shape[0]
    G = Hq // k.shape[0]
    out = np.zeros_like(qv)
    for h in range(Hq):
        s = k[h // G] @ qv[h] * scale
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[h // G]
    return out


def decode(q, kp, vp, bt, cl, scale=None):
    q, kp, vp = (np.asarray(a, np.float64) for a in (q, kp, vp))
    bt, cl = np.asarray(bt), np.asarray(cl)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        if cl[i] > 0:
            out[i] = attend(q[i], seq_kv(kp, bt[i], cl[i]), seq_kv(vp, bt[i], cl[i]), scale)
    return out


def prefill(q, kp, vp, qs, cl, bt, scale=None):
    q, kp, vp = (np.asarray(a, np.float64) for a in (q, kp, vp))
    qs, cl, bt = np.asarray(qs), np.asarray(cl), np.asarray(bt)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    out = np.zeros_like(q)
    for i in range(len(cl)):
        n_q = qs[i + 1] - qs[i]
        for j in range(n_q):
            pos = cl[i] - n_q + j
            t = qs[i] + j
            out[t] = attend(q[t], seq_kv(kp, bt[i], pos + 1), seq_kv(vp, bt[i], pos + 1), scale)
    return out
