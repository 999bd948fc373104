"""Streamed pruning of 7B/8B-shaped checkpoints on this CPU box: wall time and peak RSS.

Not run in CI. For each shape (Llama-2-7B: 32 layers, hidden 4096, MLP 11008, 32 heads,
vocabulary 32000; Llama-3-8B: the same with 8 key/value heads, MLP 14336, vocabulary
128256) a checkpoint with random bf16 weights (normal, std 0.02, cut from one pool of 2^26
normals at random offsets; norms at 1) is written
into shards of about 2 GB, tensor by tensor (never a whole model in memory), then pruned
by `fxslim.passes.llm_stream.llm_prune` with 25% of the (key/value) heads and 50% of the
MLP channels, (a) magnitude, (b) Wanda on 32 x 128 calibration tokens (random token
ids, seeded: the checkpoint has no tokenizer and no trained weights, so this measures
cost, not quality). Each prune runs in a fresh child process; its peak RSS is that
child's own ``ru_maxrss`` (``os.wait4``). Every file is deleted at the end.

    python -m bench.llm_stream [--root /tmp/h16/bench] [--shapes llama2-7b llama3-8b] [--cases magnitude wanda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "llama2-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "llama3-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
    },
}
SHARD_BYTES = 2 << 30


_POOL = (1 << 26) + 15  # odd, not a multiple of 3, 7 or 43: no width divides it


def _cut(pool: torch.Tensor, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=pool.dtype).view(-1)
    at = 0
    while at < out.numel():
        start = int(torch.randint(0, len(pool), (1,), generator=g))
        n = min(len(pool) - start, out.numel() - at)
        out[at : at + n] = pool[start : start + n]
        at += n
    return out.view(shape)


def write_checkpoint(folder: Path, shape: dict) -> int:
    """A random bf16 Llama checkpoint in shards, written one tensor at a time; returns its bytes."""
    import transformers as T

    from fxslim.passes._shards import INDEX, ShardWriter

    cfg = T.LlamaConfig(
        **shape, dtype="bfloat16", max_position_embeddings=4096, tie_word_embeddings=False
    )
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    shards, cur, size = [], [], 0
    for name, s in layout:
        n = 2 * torch.Size(s).numel()
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, s))
        size += n
    shards.append(cur)
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    # drawing 7e9 normals costs minutes on two shared cores: tensors are cut from one pool
    # of normals (a length prime to every width, so rows do not repeat) at random offsets
    pool = torch.empty(_POOL).normal_(0, 0.02, generator=g).to(torch.bfloat16)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(folder / fname, [(n, "BF16", s) for n, s in shard])
        for name, s in shard:
            t = (
                torch.ones(s, dtype=torch.bfloat16)
                if name.endswith("norm.weight")
                else _cut(pool, s, g)
            )
            w.write(name, t)
            weight_map[name] = fname
            del t
        w.close()
        total += w.total
    (folder / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg.save_pretrained(folder)
    return total


def child(args: argparse.Namespace) -> None:
    """One prune (in its own process): prints a JSON line with the report."""
    from fxslim.passes.llm_stream import llm_prune

    torch.set_num_threads(args.threads[0])
    calib = None
    if args.case != "magnitude":
        g = torch.Generator().manual_seed(0)
        vocab = json.loads((Path(args.checkpoint) / "config.json").read_text())["vocab_size"]
        calib = list(
            torch.randint(0, vocab, (32, 128), generator=g).split(8)
        )  # 4 batches of 8 x 128
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:  # per-layer times in the log
        print(
            f"  [{time.perf_counter() - t0:6.0f} s] {stage} {done}/{total}",
            file=sys.stderr,
            flush=True,
        )

    rep = llm_prune(
        args.checkpoint,
        args.out,
        0.25,
        0.5,
        importance=args.case,
        calib=calib,
        overwrite=True,
        progress=progress,
    )
    print(json.dumps({"wall": time.perf_counter() - t0, **rep.as_dict()}))


def run_case(ckpt: Path, out: Path, case: str, threads: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.llm_stream",
        "--child",
        case,
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--threads",
        str(threads),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    text = proc.stdout.read()
    if status != 0:
        raise SystemExit(f"{case} on {ckpt} failed (status {status})")
    rep = json.loads(text.strip().splitlines()[-1])
    return {
        "wall": wall,
        "rss_gib": usage.ru_maxrss / 2**20,
        "cpu": usage.ru_utime + usage.ru_stime,
        **{k: rep[k] for k in ("seconds", "params_before", "params_after", "bytes_after")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/h16/bench")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument(
        "--cases", nargs="+", default=["magnitude", "wanda"], choices=["magnitude", "wanda", "flap"]
    )
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch threads per case (magnitude's "
        "small chunked reductions only lose to a second thread on a shared box)",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="keep a checkpoint already written under --root"
    )
    ap.add_argument("--keep", action="store_true", help="leave the checkpoints (for --reuse)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.case = args.child
        return child(args)
    root = Path(args.root)
    rows = []
    try:
        for shape in args.shapes:
            ckpt = root / shape
            if args.reuse and (ckpt / "config.json").is_file():
                size = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"][
                    "total_size"
                ]
            else:
                shutil.rmtree(root, ignore_errors=True)
                size = write_checkpoint(ckpt, SHAPES[shape])
            print(
                f"{shape}: {size / 2**30:.1f} GiB checkpoint ready",
                flush=True,
            )
            for case, threads in zip(args.cases, args.threads):
                r = run_case(ckpt, root / f"{shape}-{case}", case, threads)
                rows.append((shape, case, size, r))
                print(
                    f"| {shape} | {case} | {threads} | {size / 2**30:.1f} | {r['params_before'] / 1e9:.2f}B -> "
                    f"{r['params_after'] / 1e9:.2f}B | {r['wall']:.0f} | {r['cpu']:.0f} | {r['rss_gib']:.2f} | "
                    + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items())
                    + " |",
                    flush=True,
                )
                shutil.rmtree(root / f"{shape}-{case}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
