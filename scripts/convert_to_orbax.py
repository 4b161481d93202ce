"""Convert a model source (HF directory, hub id, .gguf) once into the fast-path directory that `load_model`
reads without conversion: orbax params + `yaie_model.json` (+ `tokenizer/`).

    python scripts/convert_to_orbax.py SOURCE OUT_DIR [--dtype bfloat16] [--no-tokenizer]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="HF model directory, HF hub id or .gguf file")
    ap.add_argument("out_dir", help="directory to write (overwritten if it holds an earlier save)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-tokenizer", action="store_true", help="do not save the tokenizer beside the params")
    args = ap.parse_args(argv)

    from yaie_jax.models.loader import load_model, save_model
    t0 = time.perf_counter()
    model = load_model(args.source, dtype=args.dtype)
    tokenizer = None
    if not args.no_tokenizer:
        from yaie_jax.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.source)
    save_model(model, args.out_dir, tokenizer=tokenizer)
    cfg = model.config
    print(f"wrote {args.out_dir}: {cfg.arch}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{args.dtype}{'' if tokenizer is None else ', with tokenizer'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
