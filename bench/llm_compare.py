"""The tiny Llama against torch-pruning's LLM recipe, and width against depth pruning.

Not run in CI. Trains a byte-level `fxslim.runtime.text.tiny_llama` (4 layers, so depth
pruning has layers to remove) once on the stdlib-source text, then on the same model:

1. **Width, side by side**: torch-pruning 1.6's LLM recipe (its examples/LLMs/prune_llm.py
   settings: ``MetaPruner``, ``GroupNormImportance(p=2)``, uniform (non-global) ratio for
   hidden size and heads, ``prune_num_heads=True``, head dims kept for RoPE, ``round_to=4``,
   ``lm_head`` ignored, then the script's attribute fix-ups; ``output_transform`` picks the
   logits, without which torch-pruning cannot trace transformers 5's output object) against
   ``fxslim.prune(model, x, ratio=r, importance="l2")``. Pass time, parameters, test
   perplexity, and whether ``save_pretrained`` -> ``from_pretrained`` gives the same logits.
   torch-pruning runs in a child process stopped after ``--tp-timeout`` seconds.
2. **Depth**: `fxslim.prune_depth` (block influence on 8 calibration batches) removing half
   the layers, next to width pruning at about the same parameter count, each before and
   after the same short logit distillation from the original (`fxslim.distill`).

    python -m bench.llm_compare [--steps 1200] [--ratio 0.5] [--tp-timeout 600]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fxslim
from fxslim.passes.calibrated import WandaImportance
from fxslim.runtime.text import TokenRows, lm_batches, perplexity, tiny_llama, token_rows, train_lm

LAYERS = 4


def _reloads(model: Any, x: torch.Tensor) -> str:
    import transformers

    with tempfile.TemporaryDirectory() as d:
        try:
            model.save_pretrained(d)
            back = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
            with torch.no_grad():
                same = torch.allclose(back(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
            return "yes, same logits" if same else "loads, different logits"
        except Exception as exc:  # noqa: BLE001 - the outcome is the measurement
            return f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"


def _tp_prune(state: dict, ratio: float, x: torch.Tensor) -> tuple[Any, float]:
    """torch-pruning's LLM recipe on a fresh tiny Llama holding `state`."""
    import torch_pruning as tp

    model = tiny_llama(layers=LAYERS)
    model.load_state_dict(state)
    cfg = model.config
    t0 = time.perf_counter()
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    gqa = cfg.num_attention_heads != cfg.num_key_value_heads
    # the recipe's GroupNormImportance is called GroupMagnitudeImportance in torch-pruning 1.6
    norm = getattr(tp.importance, "GroupNormImportance", None) or tp.importance.GroupMagnitudeImportance
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=x, importance=norm(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4,
        # transformers 5 returns an output object; the recipe's tracer needs the logits tensor
        output_transform=lambda out: out.logits,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    cfg.hidden_size = model.lm_head.in_features  # the recipe's fix-ups, as its script does them
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            m.hidden_size = m.q_proj.out_features
            m.num_heads = m.hidden_size // m.head_dim
            cfg.num_attention_heads = m.num_heads
            if not gqa:
                m.num_key_value_heads = m.num_heads
            m.num_key_value_groups = m.num_heads // getattr(m, "num_key_value_heads", cfg.num_key_value_heads)
        elif name.endswith("mlp"):
            m.hidden_size = m.gate_proj.in_features
            cfg.intermediate_size = m.gate_proj.out_features
    if not gqa:
        cfg.num_key_value_heads = cfg.num_attention_heads
    return model.eval(), time.perf_counter() - t0


def _tp_child(state: dict, ratio: float, x: torch.Tensor, test: list, queue: Any) -> None:
    torch.set_num_threads(1)
    try:
        model, seconds = _tp_prune(state, ratio, x)
        try:
            ppl = perplexity(model, test)
        except Exception as exc:  # noqa: BLE001 - the outcome is the measurement
            ppl = f"does not run: {type(exc).__name__}"
        queue.put({"seconds": seconds, "params": fxslim.count_params(model), "ppl": ppl, "reloads": _reloads(model, x)})
    except Exception as exc:  # noqa: BLE001
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})


def torch_pruning_row(state: dict, ratio: float, x: torch.Tensor, test: list, timeout: float) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_tp_child, args=(state, ratio, x, test, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"error": f"stopped after {timeout:.0f} s"}
    return queue.get() if not queue.empty() else {"error": f"exited with code {proc.exitcode}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tp-timeout", type=float, default=600)
    ap.add_argument("--distill-batches", type=int, default=150)
    ap.add_argument("--cache", default=f"/tmp/fxslim_tiny_llama_{LAYERS}l.pt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_llama(layers=LAYERS)
    cache = Path(args.cache)
    if cache.exists():
        model.load_state_dict(torch.load(cache))
    else:
        info = train_lm(model, steps=args.steps)
        torch.save(model.state_dict(), cache)
        print(f"original: {info['steps']} steps in {info['seconds']:.0f} s (1 thread)")
    test = lm_batches("test", n_batches=16, batch_size=16, seq_len=128, seed=0)
    calib = lm_batches("train", n_batches=8, batch_size=8, seq_len=128, seed=100)
    x = calib[0]["input_ids"][:1, :32]
    n0, base = fxslim.count_params(model), perplexity(model, test)
    print(f"original: {LAYERS} layers, {n0} parameters, test perplexity {base:.3f}")

    rows = []
    t0 = time.perf_counter()
    small = fxslim.prune(model, {"input_ids": x}, ratio=args.ratio, importance="l2")
    t = time.perf_counter() - t0
    rows.append(("fxslim.prune (L2)", f"{t:.2f}", fxslim.count_params(small) / n0, f"{perplexity(small, test):.2f}",
                 _reloads(small, x)))
    print(rows[-1], flush=True)
    tp = torch_pruning_row(model.state_dict(), args.ratio, x, test, args.tp_timeout)
    if "error" in tp:
        rows.append(("torch-pruning 1.6 recipe", tp["error"], "-", "-", "-"))
    else:
        ppl = tp["ppl"] if isinstance(tp["ppl"], str) else f"{tp['ppl']:.2f}"
        rows.append(("torch-pruning 1.6 recipe", f"{tp['seconds']:.2f}", tp["params"] / n0, ppl, tp["reloads"]))
    print(rows[-1], flush=True)

    # depth vs width at about the same parameter count, before and after distillation
    t0 = time.perf_counter()
    deep = fxslim.prune_depth(model, calib, n_remove=LAYERS // 2)
    td = time.perf_counter() - t0
    target = fxslim.count_params(deep.model) / n0
    t0 = time.perf_counter()
    wide = fxslim.prune(model, {"input_ids": x}, target_params=target,
                        importance=WandaImportance(calib))
    tw = time.perf_counter() - t0
    train_rows = token_rows(lm_batches("train", n_batches=args.distill_batches, batch_size=16, seed=7))
    val_rows = token_rows(lm_batches("val", n_batches=4, batch_size=16, seed=0))
    versus = []
    for name, m, secs in ((f"depth: {LAYERS // 2} of {LAYERS} layers removed (block influence)", deep.model, td),
                          ("width: Wanda, uniform per layer type, same params", wide, tw)):
        before = perplexity(m, test)
        fxslim.distill(TokenRows(m), TokenRows(model), train_rows, val_rows, epochs=1, lr=3e-3, alpha=1.0,
                       temperature=1.0, progress=False)
        versus.append((name, f"{secs:.2f}", fxslim.count_params(m) / n0, f"{before:.2f}", f"{perplexity(m, test):.3f}"))
        print(versus[-1], flush=True)
    print(f"\nblock influence: {', '.join(f'{k} {v:.4f}' for k, v in deep.scores.items())}; removed {deep.removed}")
    print(f"\nTiny Llama ({LAYERS} layers, {n0} parameters, test perplexity {base:.3f}), ratio {args.ratio}:\n")
    print("| tool | pass time (s) | params kept | perplexity | save_pretrained -> from_pretrained |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2] if isinstance(r[2], str) else f'{r[2]:.3f}'} | {r[3]} | {r[4]} |")
    print("\n| pruning | pass time (s) | params kept | perplexity | + distilled |")
    print("|---|---|---|---|---|")
    for r in versus:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]} | {r[4]} |")


if __name__ == "__main__":
    main()
