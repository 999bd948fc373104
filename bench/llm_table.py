"""The built-in tiny LLM pruned to 0.5x parameters: magnitude vs calibrated importance.

Not run in CI. Trains `fxslim.runtime.text.tiny_llama` once on the stdlib-source text
(1 thread), then for each criterion (magnitude, Wanda, FLAP, first-order Taylor) and
calibration seed prunes it with ``fxslim.prune(model, x, target_params=0.5,
importance=...)`` (uniform ratio per layer type, so the result is a `LlamaForCausalLM`
again), and reports test perplexity of the original, the pruned model, the pruned model
with FLAP's bias compensation on o_proj and down_proj (`fxslim.passes.compensate`), and
the pruned model after a short logit distillation from the original (`fxslim.distill`
through `fxslim.runtime.text.TokenRows`).

    python -m bench.llm_table --steps 1200 --seeds 3 --distill-batches 150
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import fxslim
from fxslim.passes.calibrated import FLAPImportance, LMTaylorImportance, WandaImportance
from fxslim.passes.compensate import compensate_bias
from fxslim.runtime.text import TokenRows, lm_batches, perplexity, tiny_llama, token_rows, train_lm


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200, help="training steps of the original")
    ap.add_argument("--seeds", type=int, default=3, help="calibration seeds per activation-aware criterion")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--distill-batches", type=int, default=150, help="0: no distillation")
    ap.add_argument("--criteria", nargs="+", default=["magnitude", "wanda", "flap", "taylor"],
                    choices=["magnitude", "wanda", "flap", "taylor"])
    ap.add_argument("--cache", default="/tmp/fxslim_tiny_llama.pt", help="trained weights (reused when present)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = tiny_llama()
    cache = Path(args.cache)
    if cache.exists():
        model.load_state_dict(torch.load(cache))
        print(f"original: loaded from {cache}")
    else:
        info = train_lm(model, steps=args.steps)
        torch.save(model.state_dict(), cache)
        print(f"original: {info['steps']} steps in {info['seconds']:.0f} s (1 thread), last loss {info['loss']:.3f}")
    test = lm_batches("test", n_batches=16, batch_size=16, seq_len=128, seed=0)
    base = perplexity(model, test)
    n0 = sum(p.numel() for p in model.parameters())
    print(f"original: {n0} parameters, test perplexity {base:.3f}")

    criteria = {"magnitude (L1)": lambda calib: None,
                "Wanda (consumer columns)": lambda calib: WandaImportance(calib),
                "FLAP fluctuation": lambda calib: FLAPImportance(calib),
                "Taylor (first order, model loss)": lambda calib: LMTaylorImportance(calib)}
    short = dict(zip(("magnitude", "wanda", "flap", "taylor"), criteria))
    criteria = {short[k]: criteria[short[k]] for k in args.criteria}
    train_rows = token_rows(lm_batches("train", n_batches=max(args.distill_batches, 1), batch_size=16, seed=7))
    val_rows = token_rows(lm_batches("val", n_batches=4, batch_size=16, seed=0))
    table = []
    for name, make in criteria.items():
        pruned_ppl, comp_ppl, distilled_ppl, seconds, kept = [], [], [], [], []
        seeds = [0] if name.startswith("magnitude") else range(args.seeds)  # magnitude reads no data
        for seed in seeds:
            calib = lm_batches("train", n_batches=args.calib_batches, batch_size=8, seq_len=128, seed=100 + seed)
            t = time.perf_counter()
            crit = make(calib)
            small = fxslim.prune(model, {"input_ids": calib[0]["input_ids"]}, target_params=0.5, importance=crit)
            seconds.append(time.perf_counter() - t)
            kept.append(sum(p.numel() for p in small.parameters()) / n0)
            pruned_ppl.append(perplexity(small, test))
            comp = compensate_bias(model, small, getattr(crit, "stats", None), data=calib, layers=["o_proj", "down_proj"])
            comp_ppl.append(perplexity(comp, test))
            if args.distill_batches:
                fxslim.distill(TokenRows(small), TokenRows(model), train_rows, val_rows, epochs=1, lr=3e-3,
                               alpha=1.0, temperature=1.0, progress=False)
                distilled_ppl.append(perplexity(small, test))
            print(f"{name} seed {seed}: {type(small).__name__}, params x{kept[-1]:.3f}, pass {seconds[-1]:.1f} s, "
                  f"ppl {pruned_ppl[-1]:.3f}, bias-compensated {comp_ppl[-1]:.3f}" + (f" -> distilled {distilled_ppl[-1]:.3f}" if distilled_ppl else ""))
        table.append((name, len(seeds), spread(kept), spread(seconds), spread(pruned_ppl), spread(comp_ppl),
                      spread(distilled_ppl) if distilled_ppl else "-"))
    print(f"\nTest perplexity, tiny Llama (original {base:.3f}, {n0} parameters), pruned to 0.5x parameters:\n")
    print("| importance | seeds | params kept | pass time (s) | perplexity | + bias comp. | + distilled |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(str(c) for c in r) + " |")


if __name__ == "__main__":
    main()
