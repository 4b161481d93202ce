"""Fine-tune a model with optax, plot the loss, save it, then generate through the engine.

    python scripts/finetune.py --task count --out runs/count      # tiny GPT-2 learns "count up by one"
    python scripts/finetune.py --model DIR --text corpus.txt --out runs/ft

The synthetic `count` task: sequences x, x+1, x+2, ... over token ids 1..64 (wrapping). A tiny GPT-2 reaches
near-zero loss in a few hundred steps on a CPU; the engine then continues any start token exactly.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from tqdm.auto import tqdm

COUNT_VOCAB = 64


def count_batch(rng, batch: int, seq: int) -> np.ndarray:
    start = rng.integers(0, COUNT_VOCAB, size=(batch, 1))
    return (start + np.arange(seq)[None, :]) % COUNT_VOCAB + 1        # [batch, seq] ids in 1..64


def text_batches(tokenizer, path: str, seq: int):
    ids = np.array(tokenizer.encode(open(path).read()), np.int32)
    n = len(ids) // seq
    return ids[: n * seq].reshape(n, seq)


def build_tiny_gpt2(out_dir: str, seed: int = 0) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import support
    return support.make_gpt2_dir(out_dir, vocab_size=384, n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                 seed=seed, initializer_range=0.02)


def finetune(model_dir: str, out_dir: str, *, task: str = "count", text: str = None, steps: int = 300,
             batch: int = 32, seq: int = 24, lr: float = 3e-3, seed: int = 0, plot: bool = True):
    """Train, save for serving, return (saved_dir, losses)."""
    from yaie_jax.models import load_model
    from yaie_jax.research import make_train_step, optax_adamw, save_for_serving
    from yaie_jax.tokenizer import load_tokenizer

    model = load_model(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    train = make_train_step(model, optax_adamw(lr))
    params, opt_state = model.params, train.init(model.params)
    rng = np.random.default_rng(seed)
    data = text_batches(tokenizer, text, seq) if text else None
    losses = []
    for _ in tqdm(range(steps), desc="fine-tuning", unit="step"):
        if data is None:
            ids = count_batch(rng, batch, seq)
        else:
            ids = data[rng.integers(0, len(data), size=batch)]
        params, opt_state, loss = train(params, opt_state, ids)
        losses.append(float(loss))
    saved = save_for_serving(model, params, out_dir, tokenizer)
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("next-token loss")
        ax.set_title(f"fine-tuning ({task if not text else os.path.basename(text)})")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "loss.png"), dpi=100)
        plt.close(fig)
    return saved, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: a fresh tiny GPT-2)")
    ap.add_argument("--task", default="count", choices=["count"])
    ap.add_argument("--text", default=None, help="train on this text file instead of the synthetic task")
    ap.add_argument("--out", default="runs/finetune")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    model_dir = args.model or build_tiny_gpt2(os.path.join(args.out, "base"))
    saved, losses = finetune(model_dir, os.path.join(args.out, "trained"), task=args.task, text=args.text,
                             steps=args.steps, lr=args.lr)
    print(f"final loss {losses[-1]:.4f}; saved to {saved}; plot {os.path.join(saved, 'loss.png')}")
    from yaie_jax import LLM, SamplingParams
    llm = LLM(saved, dtype="float32", warmup=False)
    starts = [[5], [17], [60]]
    for s, out in zip(starts, llm.generate(starts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)):
        print(s, "->", out.outputs[0].token_ids)


if __name__ == "__main__":
    main()
