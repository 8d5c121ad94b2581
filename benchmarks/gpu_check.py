"""The GPU check: exactness on CUDA, and training throughput and peak memory of S3T against a plain PEFT LoRA
fine-tune of the same model, for a ~1.1B-parameter LLaMA-shaped decoder and a ViT-Base-shaped encoder.

    python benchmarks/gpu_check.py              # on a CUDA machine (sized for ~10 minutes on one GPU; never timed yet)
    python benchmarks/gpu_check.py --dry-run    # anywhere: tiny configs on the CPU, one pass of every path
    bash benchmarks/gpu_check.sh                # the same as the first line

1. Exactness: `pytest tests/test_exactness.py tests/test_generation.py tests/test_vision.py` with
   S3T_TEST_DEVICE=cuda (tests/conftest.py puts the tiny runs' plans on that device): after deletions and after
   `restore()` the served model equals a fresh GPU training on the reduced data, bit for bit (text encoder, ViT
   and causal LM).
2. Throughput and memory, each side in a fresh child process (so one side's allocations never count for the
   other), both on the same randomly initialised model saved with `save_pretrained`, the same records, LoRA rank
   8 on the same query/value projections of the same top blocks, the same batch size and sequence length,
   float32, deterministic algorithms and eager attention on both sides (what s3t runs with on CUDA; the PEFT side
   only warns where an op has no deterministic kernel):
   - s3t:  `S3T.create(...).train()` with m = 2 shards, L = 2 slices of 2 blocks, B = 2 orders, one epoch per
           stage: the whole training, trunk-cache fill (encrypted, on disk) included;
   - peft: `peft.get_peft_model` and a plain AdamW loop, one epoch over the same records.
   tokens/s = tokens trained / wall seconds, where a record counts `max_length` tokens (197 for a 224 px ViT
   image) each time a stage or epoch trains on it; S3T trains each record in several stages, so compare the
   total seconds too, not only tokens/s. Peak memory: torch.cuda.max_memory_allocated.
Results: benchmarks/results/gpu_check.json (and a printed table). Without CUDA (and without --dry-run) it prints one
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
EXACTNESS_TESTS = ("tests/test_exactness.py", "tests/test_generation.py", "tests/test_vision.py")

# The measured models. "full": what a GPU run uses; "tiny": --dry-run on the CPU.
MODELS = {
    "llama": {   # TinyLlama-1.1B's shape: 22 blocks, hidden 2048, 32 heads (4 key/value heads), vocab 32,000
        "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
        "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=600, max_position_embeddings=128),
    },
    "vit": {     # ViT-Base/16 at 224 px: 12 blocks, hidden 768, 12 heads (86M parameters)
        "full": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     image_size=224, patch_size=16, num_channels=3),
        "tiny": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                     image_size=16, patch_size=4, num_channels=3),
    },
}
# Records, sequence length and batch size per model and size.
WORKLOAD = {
    ("llama", "full"): dict(records=512, max_length=256, batch_size=8),
    ("llama", "tiny"): dict(records=16, max_length=32, batch_size=8),
    ("vit", "full"): dict(records=1024, batch_size=32),
    ("vit", "tiny"): dict(records=16, batch_size=8),
}
SHARDS, SLICES, BUDGET, BLOCKS_PER_SLICE, RANK = 2, 2, 2, 2, 8


def log(message: str) -> None:
    print(message, flush=True)


# -- building the models -------------------------------------------------------------------------------------
def build(kind: str, size: str, folder: Path) -> Path:
    """A randomly initialised model of `kind` saved to `folder` (with a tokenizer or an image-processor config)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, ViTConfig
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    config = MODELS[kind][size]
    if kind == "llama":
        tokenizer = bpe(vocab_size=min(1000, config["vocab_size"]))
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config, bos_token_id=1, eos_token_id=2,
                                                             pad_token_id=0))
        tokenizer.save_pretrained(folder)
    else:
        model = AutoModel.from_config(ViTConfig(**config), add_pooling_layer=False)
        side = config["image_size"]
        ViTImageProcessorPil(size={"height": side, "width": side}).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def bpe(vocab_size: int):
    """A byte-level BPE trained on BBC News text, <pad>/<s>/</s> at ids 0/1/2 (the model's vocabulary is larger:
    the embedding and LM head keep the real model's shape)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    import s3t

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r.text for r in list(s3t.datasets.bbc_news())[:300]], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def records(kind: str, n: int):
    """The training data: BBC prompt/completion pairs (headline -> body) or synthetic labelled images."""
    import s3t

    if kind == "vit":
        return s3t.datasets.synthetic_images(n, num_labels=5, size=32, seed=0)
    rows = []
    for r in list(s3t.datasets.bbc_news())[:n]:
        title, _, body = r.text.partition("\n")
        rows.append(dict(id=r.id, prompt=title.strip() + "\n", completion=" ".join(body.split())))
    return s3t.Dataset.from_records(rows)


# -- one side, in its own process --------------------------------------------------------------------------
def measure_side(kind: str, side: str, size: str, folder: Path, device: str) -> dict:
    """Train one side once and report its wall time, tokens trained, tokens/s and peak memory."""
    import torch

    from s3t.models.base import quiet_transformers

    quiet_transformers()
    warnings.filterwarnings("ignore", category=FutureWarning)   # peft calls a renamed transformers method
    work = dict(WORKLOAD[(kind, size)])
    data = records(kind, work["records"])
    tokens_per_record = (MODELS[kind][size]["image_size"] // MODELS[kind][size]["patch_size"]) ** 2 + 1 \
        if kind == "vit" else work["max_length"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if side == "s3t":
            examples, parameters = _train_s3t(kind, folder, data, work, device, Path(tmp))
        else:
            examples, parameters = _train_peft(kind, folder, data, work, device)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"model": kind, "side": side, "size": size, "device": device, "parameters": parameters,
            "records": len(data), "examples_trained": examples, "tokens_trained": examples * tokens_per_record,
            "seconds": seconds, "tokens_per_s": examples * tokens_per_record / seconds,
            "peak_memory_bytes": peak}


def _train_s3t(kind, folder, data, work, device, tmp: Path) -> tuple[int, int]:
    import s3t

    plan = s3t.Plan(num_shards=SHARDS, num_slices=SLICES, budget=BUDGET, blocks_per_slice=BLOCKS_PER_SLICE,
                    lora_rank=RANK, lora_alpha=2.0 * RANK, epochs=1, batch_size=work["batch_size"],
                    max_length=work.get("max_length", 128), base_model=str(folder), device=device, seed=0)
    system = s3t.S3T.create(tmp / "run", plan, data)
    system.train(progress=False)
    from sqlalchemy import select

    from s3t.registry import artifacts

    with system.registry.engine.connect() as conn:
        examples = sum(r.examples for r in conn.execute(select(artifacts)))
    parameters = sum(p.numel() for name, p in system.trainer.model.model.named_parameters() if "lora_" not in name)
    system.close()
    return examples * plan.epochs, parameters


def _train_peft(kind, folder, data, work, device) -> tuple[int, int]:
    """A plain PEFT LoRA fine-tune: LoRA on the same projections of the same top blocks, AdamW, one epoch."""
    import peft
    import torch

    from s3t.models.base import default_lora_targets, find_blocks

    # as s3t trains on CUDA; warn_only: an op without a deterministic kernel warns here instead of ending the check
    torch.use_deterministic_algorithms(device == "cuda", warn_only=True)
    kwargs = {"attn_implementation": "eager"} if device == "cuda" else {}
    batch_size = work["batch_size"]
    if kind == "llama":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        T = work["max_length"]
        rows = [tokenizer(r.prompt + r.completion, truncation=True, max_length=T, padding="max_length")
                for r in data]
        ids = torch.tensor([r["input_ids"] for r in rows])
        mask = torch.tensor([r["attention_mask"] for r in rows])
        batches = [dict(input_ids=ids[b:b + batch_size], attention_mask=mask[b:b + batch_size],
                        labels=ids[b:b + batch_size].masked_fill(mask[b:b + batch_size] == 0, -100))
                   for b in range(0, len(rows), batch_size)]
        head = None
    else:
        from transformers import AutoImageProcessor, AutoModel

        from s3t.images import decode

        processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        model = AutoModel.from_pretrained(folder, dtype=torch.float32, add_pooling_layer=False, **kwargs)
        pixels = torch.cat([processor(images=[decode(r.image, "RGB")], return_tensors="pt")["pixel_values"]
                            for r in data])
        names = sorted(set(r.label for r in data))
        targets = torch.tensor([names.index(r.label) for r in data])
        batches = [dict(pixel_values=pixels[b:b + batch_size], targets=targets[b:b + batch_size])
                   for b in range(0, len(pixels), batch_size)]
        head = torch.nn.Linear(model.config.hidden_size, len(names))
    blocks_path, blocks = find_blocks(model)
    n = len(blocks)
    adapted = list(range(n - SLICES * BLOCKS_PER_SLICE, n))
    config = peft.LoraConfig(r=RANK, lora_alpha=2.0 * RANK, target_modules=list(default_lora_targets(blocks[0])),
                             layers_to_transform=adapted, layers_pattern=blocks_path.rpartition(".")[2])
    model = peft.get_peft_model(model, config).to(device)
    parameters = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if head is not None:
        head.to(device)
        trainable += list(head.parameters())
    optimiser = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if head is None:
            loss = model(**batch).loss
        else:
            hidden = model(pixel_values=batch["pixel_values"]).last_hidden_state[:, 0]
            loss = torch.nn.functional.cross_entropy(head(hidden), batch["targets"])   # after the final layernorm
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return len(data), parameters


def run_child(kind: str, side: str, size: str, folder: Path, device: str) -> dict:
    """measure_side in a fresh interpreter, so that peak memory is this side's alone."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        cmd = [sys.executable, __file__, "--side", f"{kind}:{side}", "--size", size, "--folder", str(folder),
               "--device", device, "--side-out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
        return json.loads(out.read_text())


def _pythonpath() -> str:
    parts = [str(ROOT / "src"), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


# -- the check -----------------------------------------------------------------------------------------------
def exactness(device: str, *, dry_run: bool) -> dict:
    """The exactness tests on `device` (a dry run only collects them, on the CPU)."""
    missing = [t for t in EXACTNESS_TESTS if not (ROOT / t).is_file()]
    if missing:
        raise SystemExit(f"gpu_check: exactness tests missing: {missing}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EXACTNESS_TESTS]
    if dry_run:
        log(f"exactness (dry run, not executed): S3T_TEST_DEVICE={device} {' '.join(cmd[1:])}")
        return {"command": " ".join(cmd[1:]), "ran": False}
    log(f"exactness: S3T_TEST_DEVICE={device} {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "S3T_TEST_DEVICE": device, "PYTHONPATH": _pythonpath()},
                          capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    log("\n".join(tail))
    return {"command": " ".join(cmd[1:]), "ran": True, "returncode": done.returncode,
            "seconds": time.perf_counter() - t0, "summary": tail[-1] if tail else ""}


def table(rows: list[dict]) -> str:
    lines = [f"{'model':6s} {'side':5s} {'base params':>14s} {'examples':>9s} {'seconds':>9s} {'tokens/s':>11s} "
             f"{'peak memory':>12s}"]
    for r in rows:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
        lines.append(f"{r['model']:6s} {r['side']:5s} {r['parameters']:14,d} {r['examples_trained']:9d} "
                     f"{r['seconds']:9.1f} {r['tokens_per_s']:11.0f} {peak:>12s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="exactness, throughput and memory on a CUDA GPU")
    parser.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU, one pass of every path")
    parser.add_argument("--skip-tests", action="store_true", help="only the throughput and memory measurements")
    parser.add_argument("--models", default="llama,vit", help="comma-separated: llama, vit")
    parser.add_argument("--out", type=Path, default=None, help=f"result JSON (default {OUT.relative_to(ROOT)})")
    # the child process of one side
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    # Called in-process by the smoke test: give the caller its thread count, deterministic-algorithm setting and
    # global RNG back (a run created later resolves its num_threads from torch's, and that enters its lineages).
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with torch.random.fork_rng(devices=[]):
            return _main(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _main(args) -> int:
    if args.side:   # child: one side of one model
        kind, side = args.side.split(":")
        result = measure_side(kind, side, args.size, args.folder, args.device)
        args.side_out.write_text(json.dumps(result))
        return 0

    import torch

    from s3t.models.base import quiet_transformers   # (importing s3t.models also sets CUBLAS_WORKSPACE_CONFIG)

    quiet_transformers()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False): nothing was run; "
              "use --dry-run to check the script on the CPU")
        return 2
    device, size = ("cpu", "tiny") if args.dry_run else ("cuda", "full")
    if args.dry_run:
        torch.set_num_threads(1)
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "dry_run": args.dry_run,
              "torch": torch.__version__}
    if not args.skip_tests:
        result["exactness"] = exactness(device, dry_run=args.dry_run)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            folder = build(kind, size, Path(tmp) / kind)
            for side in ("s3t", "peft"):
                # the dry run stays in this process (it is a smoke test); a real run isolates each side's memory
                row = measure_side(kind, side, size, folder, device) if args.dry_run else \
                    run_child(kind, side, size, folder, device)
                log(f"{kind} {side}: {row['tokens_per_s']:.0f} tokens/s over {row['seconds']:.1f} s")
                rows.append(row)
    result["throughput"] = rows
    result["wall_s"] = time.perf_counter() - started
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check_dry_run.json" if args.dry_run else OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(table(rows))
    log(f"wrote {out} in {result['wall_s']:.0f} s")
    failed = result.get("exactness", {}).get("returncode", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
