"""Real-model quality and numerics against HF transformers, shared by tests/quality, scripts/bench_numerics.py and
scripts/quality_suite.py: the chat prompts, the public-domain text, HF references, the engine runs that expose each
path's logprobs, and their comparison.

Paths, as the engine runs them (one engine: max_num_batched_tokens=BUDGET, prefix caching on):
  prefill   whole chat prompts computed in one step: prompt logprobs of every prompt position + the first token's
  chunked   the text (longer than BUDGET) in chunks of at most BUDGET tokens: its prompt logprobs
  cached    a chat prompt sent again (its full blocks come from the prefix cache): the first generated token's
  decode    every generated token after the first (batched greedy run and the single re-sent prompts)
Each measured position carries the engine's logprobs of its top-20 tokens (plus the target's). The reference is HF
transformers on the same token sequence (prompt + what the engine generated): fp32, and in the engine's dtype (the
bar: our error against HF fp32 must stay within what HF itself makes in that dtype).
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import platform
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_PATH = os.path.join(ROOT, "tests", "quality", "data", "gettysburg.txt")
BUDGET = 128           # max_num_batched_tokens of the measuring engine: the text is chunked, chat prompts are not
TOPK = 20
GREEDY_TOKENS = 24     # greedy tokens per chat prompt in the quality suite (answers usually end with EOS before)

# Pass marks shared by tests/quality and scripts/quality_suite.py (measurements: bench/NOTES.md §17)
FP32_TOL = 2e-3          # fp32 engine: max |logprob - HF fp32| (what differs is only the summation order)
MARGIN = 1.25            # 16-bit engine: our mean error at most this times HF's own in that dtype
MAX_MARGIN = 1.5         # ... and our max error (one position decides it; Pallas bf16 prefill: 1.24x, NOTES §17)
TOP1_SLACK = 0.02        # ... and top-1 agreement with HF fp32 at most this below HF's in that dtype
MIN_POSITIONS = 30       # a path with fewer positions is judged against HF's error pooled over the whole run
PPL_TOL = {"float32": 0.005, "bfloat16": 0.02, "float16": 0.02}   # |ppl / HF fp32 ppl - 1|
BF16_EXACT_FLOOR = 0.75  # 16-bit greedy answers equal to HF fp32's (fraction of prompts; CPU bf16: 20/24)
BF16_PREFIX_FLOOR = 0.80  # mean common prefix with HF fp32's answer (fraction of its length; CPU bf16: 0.866)
# ... or, where HF transformers itself agrees less in that dtype on the device, as well as HF within chance
# (greedy_floor_failures; H200 bf16: HF 18/24, the Mosaic kernels 15/24: bench/NOTES.md §19)

PROMPTS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "What is 7 times 8?",
    "What is 15 plus 27?",
    "Name three colors.",
    "List the first five planets from the sun.",
    'Translate "Good morning" into Spanish.',
    'Translate "thank you" into French.',
    'Who wrote "Romeo and Juliet"?',
    "What is the boiling point of water in Celsius?",
    "What is the largest ocean on Earth?",
    "What gas do plants absorb from the air?",
    "How many days are in a week?",
    'What is the opposite of "hot"?',
    "Write a haiku about the sea.",
    'Give me a synonym for "happy".',
    "What is the square root of 81?",
    "Name a mammal that can fly.",
    "What language is spoken in Brazil?",
    "Who painted the Mona Lisa?",
    "What color do you get by mixing blue and yellow?",
    "Complete the sequence: 2, 4, 6, 8,",
    "Name the four seasons of the year.",
]


def load_text() -> str:
    """The perplexity text without its source header line."""
    with open(TEXT_PATH, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith("# Source:"), "the text file must start with its source line"
    return "\n".join(lines[1:]).strip() + "\n"


def environment() -> dict:
    import jax
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": jax.default_backend(),
            "jax": jax.__version__, "python": platform.python_version(), "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------ HF side

def accelerator_device() -> str:
    """Where HF runs its 16-bit reference: on the engine's kind of device (a GPU's bf16 kernels round otherwise
    than a CPU's), so "HF's own error in that dtype" is measured where ours is."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def hf_model(path: str, dtype: str = "float32", base=None, device: str = "cpu"):
    """HF transformers' model from the GGUF (dequantized as HF does), eval mode; `base`: an fp32 model to copy
    and cast (and move to `device`) instead of loading again."""
    import torch
    from transformers import AutoModelForCausalLM
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if base is not None:
        return copy.deepcopy(base).to(device=device, dtype=tdt).eval()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval().to(device)
    return model.to(tdt)


def hf_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def stop_ids(tok, model) -> List[int]:
    """The token ids that end an answer, by the engine's rule (LLMEngine._eos_ids): the tokenizer's EOS and the
    model config's (HF: its generation config's and config's). Tokenizer builds differ between transformers
    versions in which of SmolLM2's ids they call EOS (<|endoftext|> or <|im_end|>); the union does not."""
    ids = set()
    for v in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
              getattr(model.config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)


def chat_ids(tok, prompt: str) -> List[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def hf_logprobs(model, ids: List[int]) -> np.ndarray:
    """float64 log_softmax of HF's logits for one sequence: [len, vocab]."""
    import torch
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)], device=dev)).logits[0].double().cpu().numpy()
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def hf_greedy(model, prompt_ids: List[int], max_new: int, eos_ids: List[int]) -> List[int]:
    """HF `generate`, greedy, stopping after an EOS (included, as the engine's token_ids include it)."""
    import torch
    dev = next(model.parameters()).device
    x = torch.tensor([list(prompt_ids)], device=dev)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=list(eos_ids), pad_token_id=eos_ids[0])
    new = out[0, x.shape[1]:].tolist()
    for i, t in enumerate(new):
        if t in eos_ids:
            return new[:i + 1]
    return new


# ------------------------------------------------------------------------------------------------ engine side

def engine_args(dtype: str, backend: str, **overrides) -> dict:
    """The measuring engine: chat prompts fit one step, the text does not (chunked); a small KV pool."""
    args = dict(dtype=dtype, attention_backend=backend, max_num_batched_tokens=BUDGET, max_model_len=640,
                max_num_seqs=1 if backend == "pallas" and _on_cpu() else 32, num_gpu_blocks=400,
                enable_prefix_caching=True)
    args.update(overrides)
    return args


def _on_cpu() -> bool:
    import jax
    return jax.default_backend() == "cpu"      # Pallas runs in interpret mode there: one row at a time


def _record(path: str, ids: List[int], rows: list) -> dict:
    """rows: (position, {token: logprob}) where the position's logits predict ids[position + 1]."""
    return {"path": path, "ids": list(ids), "rows": rows}


def _gen_rows(prompt_ids, completion, first_path: str, records: list, rest_path: str = "decode"):
    ids = list(prompt_ids) + list(completion.token_ids)
    rows = [(len(prompt_ids) - 1 + i, {t: lp.logprob for t, lp in e.items()}) for i, e in
            enumerate(completion.logprobs)]
    records.append(_record(first_path, ids, rows[:1]))
    if len(rows) > 1:
        records.append(_record(rest_path, ids, rows[1:]))


def run_greedy(llm, prompt_ids: List[List[int]], max_tokens: int, records: Optional[list] = None):
    """All prompts at once, greedy, top-20 logprobs; returns the token ids of each completion. With `records`,
    their generated tokens after the first are recorded as "decode"."""
    from yaie_jax import SamplingParams
    outs = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=TOPK),
                        use_tqdm=False)
    if records is not None:
        for p, o in zip(prompt_ids, outs):
            ids = list(p) + list(o.outputs[0].token_ids)
            rows = [(len(p) + i, {t: lp.logprob for t, lp in e.items()})
                    for i, e in enumerate(o.outputs[0].logprobs[1:])]
            if rows:
                records.append(_record("decode", ids, rows))
    return [list(o.outputs[0].token_ids) for o in outs]


def run_paths(llm, prompt_ids: List[List[int]], text_ids: Optional[List[int]], max_tokens: int = 4,
              cached: bool = True) -> list:
    """The per-path records (module docstring): each prompt alone with prompt logprobs (prefill; the cache is not
    read), then alone again without (cached: its blocks were cached by the first), and the text (chunked)."""
    from yaie_jax import SamplingParams
    records: list = []
    for p in prompt_ids:
        o = llm.generate([p], SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=TOPK,
                                             prompt_logprobs=TOPK), use_tqdm=False)[0]
        rows = [(j - 1, {t: lp.logprob for t, lp in e.items()}) for j, e in enumerate(o.prompt_logprobs) if j]
        c = o.outputs[0]
        records.append(_record("prefill", list(p) + list(c.token_ids), rows))
        _gen_rows(p, c, "prefill", records)
        if not cached:
            continue
        o = llm.generate([p], SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=TOPK),
                         use_tqdm=False)[0]
        if o.num_cached_tokens == 0:
            raise AssertionError("the re-sent prompt did not hit the prefix cache")
        _gen_rows(p, o.outputs[0], "cached", records)
    if text_ids is not None:
        if len(text_ids) <= BUDGET and llm.engine.config.max_num_batched_tokens >= len(text_ids):
            raise ValueError("the text must be longer than the step budget to be chunked")
        o = llm.generate([text_ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=TOPK),
                         use_tqdm=False)[0]
        rows = [(j - 1, {t: lp.logprob for t, lp in e.items()}) for j, e in enumerate(o.prompt_logprobs) if j]
        records.append(_record("chunked", list(text_ids) + list(o.outputs[0].token_ids), rows))
    return records


# ------------------------------------------------------------------------------------------------ comparison

class References:
    """HF log_softmax per token sequence, computed once per (model, sequence)."""

    def __init__(self, models: Dict[str, object]):
        self.models = models
        self._cache: Dict[tuple, np.ndarray] = {}

    def get(self, name: str, ids: List[int]) -> np.ndarray:
        key = (name, tuple(ids))
        if key not in self._cache:
            self._cache[key] = hf_logprobs(self.models[name], ids)
        return self._cache[key]


def compare(records: list, refs: References, hf_dtype: Optional[str]) -> Dict[str, dict]:
    """Per path: positions, our max/mean |logprob - HF fp32| over each row's tokens, our top-1 agreement with HF
    fp32, and the same for HF in `hf_dtype` on the same positions and tokens (None: fp32 engine, no bar); "all":
    every position of every path."""
    acc: Dict[str, dict] = {}
    for rec in records:
        ref = refs.get("float32", rec["ids"])
        other = refs.get(hf_dtype, rec["ids"]) if hf_dtype else None
        buckets = [acc.setdefault(k, {"ours": [], "hf": [], "ours_top1": [], "hf_top1": []})
                   for k in (rec["path"], "all")]
        for pos, entry in rec["rows"]:
            toks = np.fromiter(entry.keys(), np.int64)
            lps = np.fromiter(entry.values(), np.float64)
            best = int(np.argmax(ref[pos]))
            for a in buckets:
                a["ours"].append(float(np.abs(lps - ref[pos, toks]).max()))
                a["ours_top1"].append(int(toks[np.argmax(lps)]) == best)
                if other is not None:
                    a["hf"].append(float(np.abs(other[pos, toks] - ref[pos, toks]).max()))
                    a["hf_top1"].append(int(np.argmax(other[pos])) == best)
    out = {}
    for path, a in acc.items():
        s = {"positions": len(a["ours"]), "ours_max": max(a["ours"]), "ours_mean": float(np.mean(a["ours"])),
             "ours_top1": float(np.mean(a["ours_top1"]))}
        if a["hf"]:
            s.update(hf_max=max(a["hf"]), hf_mean=float(np.mean(a["hf"])), hf_top1=float(np.mean(a["hf_top1"])))
        out[path] = s
    return out


def perplexity_of(records: list, refs: References, dtypes: List[str]) -> Dict[str, float]:
    """Perplexity of the chunked text record: ours, and HF's in each of `dtypes`, over the same positions."""
    rec = next(r for r in records if r["path"] == "chunked")
    ids = rec["ids"]
    ours = [entry[ids[pos + 1]] for pos, entry in rec["rows"]]
    out = {"tokens": len(rec["rows"]), "ours": float(np.exp(-np.mean(ours)))}
    for dt in dtypes:
        ref = refs.get(dt, ids)
        out["hf_" + dt] = float(np.exp(-np.mean([ref[pos, ids[pos + 1]] for pos, _ in rec["rows"]])))
    return out


def greedy_agreement(ours: List[List[int]], refs: List[List[int]]) -> dict:
    """Exact-match count and the mean length of the common prefix (as a fraction of HF's answer)."""
    exact = sum(a == b for a, b in zip(ours, refs))
    prefix = []
    for a, b in zip(ours, refs):
        k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        prefix.append(k / max(1, len(b)))
    return {"prompts": len(refs), "exact": exact, "exact_frac": exact / max(1, len(refs)),
            "mean_prefix_frac": float(np.mean(prefix))}


def greedy_floor_failures(ours: dict, hf16: Optional[dict]) -> List[str]:
    """The 16-bit greedy floor on `greedy_agreement` with HF fp32: the mean common prefix at or over
    BF16_PREFIX_FLOOR, and the exact count at or over BF16_EXACT_FLOOR of the prompts or, where HF's own 16-bit
    agreement on the same device (`hf16`; None: not measured) is lower, at or over HF's count less two binomial
    standard deviations (each prompt agrees or not: which prompts flip at a near tie is chance)."""
    n = ours["prompts"]
    need = BF16_EXACT_FLOOR * n
    if hf16 is not None:
        q = hf16["exact"] / n
        need = min(need, hf16["exact"] - 2.0 * math.sqrt(n * q * (1.0 - q)))
    bad = []
    if ours["exact"] < need:
        bad.append(f"16-bit greedy: {ours['exact']}/{n} answers equal HF fp32's, under {need:.1f}"
                   + (f" (HF's own in that dtype: {hf16['exact']}/{n})" if hf16 is not None else ""))
    if ours["mean_prefix_frac"] < BF16_PREFIX_FLOOR:
        bad.append(f"16-bit greedy: mean common prefix {ours['mean_prefix_frac']:.3f} under {BF16_PREFIX_FLOOR}")
    return bad


def path_failures(stats: Dict[str, dict], dtype: str) -> List[str]:
    """The pass marks above applied to `compare`'s output: a list of failures (empty = pass)."""
    bad = []
    pooled = stats["all"]
    for path, p in stats.items():
        if dtype == "float32":
            if p["ours_max"] > FP32_TOL:
                bad.append(f"{path}: max error {p['ours_max']:.2e} > {FP32_TOL}")
            continue
        bar = p if p["positions"] >= MIN_POSITIONS else pooled
        if p["ours_max"] > MAX_MARGIN * max(p["hf_max"], pooled["hf_max"]):
            bad.append(f"{path}: max error {p['ours_max']:.4f} > {MAX_MARGIN} x HF {dtype}'s "
                       f"{max(p['hf_max'], pooled['hf_max']):.4f}")
        if p["ours_mean"] > MARGIN * bar["hf_mean"]:
            bad.append(f"{path}: mean error {p['ours_mean']:.5f} > {MARGIN} x HF {dtype}'s {bar['hf_mean']:.5f}")
        if p["positions"] >= MIN_POSITIONS and p["ours_top1"] < bar["hf_top1"] - TOP1_SLACK:
            bad.append(f"{path}: top-1 {p['ours_top1']:.3f} < HF {dtype}'s {bar['hf_top1']:.3f} - {TOP1_SLACK}")
    return bad


def format_table(stats: Dict[str, dict]) -> str:
    head = f"{'path':9} {'pos':>5} {'ours max':>9} {'ours mean':>10} {'ours top1':>9} " \
           f"{'HF max':>8} {'HF mean':>8} {'HF top1':>8}"
    lines = [head]
    for path, s in stats.items():
        hf = (f"{s['hf_max']:8.4f} {s['hf_mean']:8.5f} {100 * s['hf_top1']:7.1f}%" if "hf_max" in s
              else f"{'-':>8} {'-':>8} {'-':>8}")
        lines.append(f"{path:9} {s['positions']:5d} {s['ours_max']:9.5f} {s['ours_mean']:10.6f} "
                     f"{100 * s['ours_top1']:8.1f}% {hf}")
    return "\n".join(lines)
