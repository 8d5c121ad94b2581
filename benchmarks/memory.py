"""Peak memory of serving m = 8 shards: s3t (one frozen base model, eight adapter slots) against eight separate
PEFT models (eight `get_peft_model` copies, as a per-shard deployment would hold them).

    python benchmarks/memory.py                      # embedded MiniLM-L6, m = 8, on the CPU (peak RSS)
    python benchmarks/memory.py --device cuda        # on a GPU (torch.cuda.max_memory_allocated)

Each side runs in a fresh child process: it imports everything, notes its memory (the baseline), builds the
serving state and classifies the same texts with every shard, then reports its peak. On the CPU the figure is
the peak resident set size (ru_maxrss) minus the baseline; on CUDA it is the peak of allocated GPU memory.
The s3t side is a real run (`S3T.create` with m = 8, L = 3, B = 1 on the embedded model; stages registered with
random weights by benchmarks/stubs.py, since what is measured does not depend on their values) serving through
`S3T.predict_proba`; the PEFT side puts LoRA of the same rank on the same projections of the same blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXTS = 64
SHARDS = 8
RANK = 8
MAX_LENGTH = 64


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def child(side: str, device: str) -> dict:
    import torch

    import s3t
    from s3t.models import default_model_path

    torch.set_num_threads(1)
    texts = [r.text for r in list(s3t.datasets.bbc_news())[:TEXTS]]
    baseline = rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if side == "s3t":
        from stubs import use_random_weights

        data = s3t.Dataset(list(s3t.datasets.bbc_news())[:400])
        plan = s3t.Plan(num_shards=SHARDS, num_slices=3, budget=1, lora_rank=RANK, max_length=MAX_LENGTH,
                        num_threads=1, device=device)
        with tempfile.TemporaryDirectory() as tmp:
            system = s3t.S3T.create(Path(tmp) / "run", plan, data)
            use_random_weights(system)
            system.train(progress=False)
            proba = system.predict_proba(texts)
            served = len(system.served()[1])
            params = sum(p.numel() for p in system.trainer.model.parameters())
            system.close()
    else:
        import peft
        from transformers import AutoModel, AutoTokenizer

        path = default_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        models, heads = [], []
        for _ in range(SHARDS):
            base = AutoModel.from_pretrained(path, add_pooling_layer=False)
            config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=["query", "value"])
            models.append(peft.get_peft_model(base, config).to(device).eval())
            heads.append(torch.nn.Linear(base.config.hidden_size, 5).to(device))
        probs = []
        with torch.no_grad():
            for model, head in zip(models, heads):
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                probs.append(torch.softmax(head((hidden * mask).sum(1) / mask.sum(1)), -1))
        proba = torch.stack(probs).mean(0).cpu().numpy()
        served = len(models)
        params = sum(p.numel() for m in models for p in m.parameters()) + sum(p.numel() for h in heads
                                                                               for p in h.parameters())
    out = {"side": side, "device": device, "served_shards": served, "parameters": params,
           "seconds": round(time.perf_counter() - started, 1), "predictions": len(proba)}
    if device == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_bytes"] = peak_rss_bytes() - baseline
        out["baseline_rss_bytes"] = baseline
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="serving memory at m = 8: s3t vs 8 separate PEFT models")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--side", choices=["s3t", "peft"], help=argparse.SUPPRESS)   # child mode
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    args = parser.parse_args()
    if args.side:
        print(json.dumps(child(args.side, args.device)))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device visible to torch on this machine")
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    results = {}
    for side in ("s3t", "peft"):
        proc = subprocess.run([sys.executable, __file__, "--side", side, "--device", args.device], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"the {side} child failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    s3t_peak, peft_peak = results["s3t"]["peak_bytes"], results["peft"]["peak_bytes"]
    what = "peak GPU memory allocated" if args.device == "cuda" else "peak RSS above the post-import baseline"
    print(f"serving m = {SHARDS} shards of all-MiniLM-L6-v2 (22.7M parameters), LoRA rank {RANK} on query/value of "
          f"all 6 blocks, {TEXTS} texts x {MAX_LENGTH} tokens, {args.device}; {what}:")
    print(f"  s3t (one base model, {SHARDS} adapter slots): {s3t_peak / 2**20:8.1f} MiB  "
          f"({results['s3t']['parameters'] / 1e6:.1f}M parameters held)")
    print(f"  {SHARDS} separate PEFT models:            {peft_peak / 2**20:8.1f} MiB  "
          f"({results['peft']['parameters'] / 1e6:.1f}M parameters held)")
    print(f"  ratio PEFT / s3t: {peft_peak / s3t_peak:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shards": SHARDS, "rank": RANK, "texts": TEXTS, "max_length": MAX_LENGTH,
                                    "measure": what, **results, "ratio": peft_peak / s3t_peak}, indent=2) + "\n")


if __name__ == "__main__":
    main()
