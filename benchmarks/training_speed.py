"""Training cost of s3t's pipeline against a paper-style reference and a plain LoRA fine-tune.

    python benchmarks/training_speed.py                     # demo plan on BBC News, ~7 minutes on 2 idle cores
    python benchmarks/training_speed.py --records 300       # a quick look

Four sides, each in its own subprocess (so each peak RSS is its own), on the same split:
- s3t:        the library as shipped (frozen-trunk cache, content-addressed shared prefixes);
- reference:  the paper's code's cost model — every stage runs all blocks forward and backward from the
              embeddings, no cache, and every order trains all its stages (no prefix sharing);
- fine-tune:  one plain LoRA fine-tune on all the data, adapting the same blocks as S3T, same epochs;
- fine-tune (all blocks): the same with LoRA on every block, as a plain fine-tune is usually set up.
Besides wall time, each side counts block-examples: examples x the blocks each stage runs forward and
backward. Their ratio is what the cost model allows, so the measured ratio can be read against it.
Prints a table and the ratios, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("s3t", "reference", "fine-tune", "fine-tune (all blocks)")


def run_side(side: str, records: int | None, plan_json: str, out: Path) -> None:
    """Train one side in this process and write its figures to `out`."""
    import torch

    import s3t
    from s3t.demo import demo_data
    from s3t.training import Trainer
    from stubs import TRAINER_FIELDS, NoCache

    class ReferenceTrainer(Trainer):
        """Full forward/backward through every block at every stage; no cache; no prefix sharing."""

        def batch_loss(self, batch, start, targets):
            bb = self.model
            prepared = bb.prepare([self.texts[i] for i in batch])
            hidden = bb.embed(prepared).detach().requires_grad_(True)  # backprop to the bottom
            y = torch.tensor([targets[i] for i in batch])
            return bb.loss(bb.top(hidden, prepared, 0), prepared, y)

        def _usable(self, lineage):
            return lineage in self.trained_here   # never reuse a stage another order already trained

        def register(self, trained, **kwargs):
            self.trained_here.add(trained.job.lineage)
            super().register(trained, **kwargs)

    plan = s3t.Plan.from_json(plan_json)
    train, test = demo_data()
    if records:   # a seeded sample: the files are sorted by class
        import random

        train = train.subset(random.Random(0).sample(list(train.ids), records))
    from s3t.models import count_blocks, resolve_model_path

    num_blocks = count_blocks(resolve_model_path(plan.base_model))
    per_group = plan.blocks_for(num_blocks)
    if side.startswith("fine-tune"):   # one group spanning every block the S3T plan adapts, or all blocks
        per_group = num_blocks if side.endswith("(all blocks)") else plan.num_slices * per_group
        plan = plan.replace(num_shards=1, num_slices=1, budget=1, blocks_per_slice=per_group)
    # Blocks a stage runs forward and backward: S3T stage i runs groups 1..i; the reference runs every block.
    blocks = (lambda stage: num_blocks) if side == "reference" else (lambda stage: stage * per_group)
    with tempfile.TemporaryDirectory() as tmp:
        system = s3t.S3T.create(Path(tmp) / "run", plan, train)
        if side == "reference":
            base = system.trainer
            ref = ReferenceTrainer(cache=NoCache(), **{f: getattr(base, f) for f in TRAINER_FIELDS})
            ref.texts = {r.id: r.text for r in train}
            ref.trained_here = set()
            system._trainer = ref
        torch.manual_seed(0)
        started = time.perf_counter()
        system.train(progress=False)
        seconds = time.perf_counter() - started
        trained = _artifacts(system)
        stage_examples = sum(row["examples"] for row in trained) * plan.epochs
        block_examples = sum(row["examples"] * blocks(row["stage"]) for row in trained) * plan.epochs
        figures = {"side": side, "plan": plan.to_dict(), "train_records": len(train), "seconds": round(seconds, 1),
                   "stages_trained": len(trained), "stage_examples": stage_examples,
                   "block_examples": block_examples, "examples_per_s": round(stage_examples / seconds, 1),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                   "accuracy": round(system.score(test), 4)}
        system.close()
    out.write_text(json.dumps(figures))


def _artifacts(system) -> list[dict]:
    from sqlalchemy import select

    from s3t.registry import artifacts

    with system.registry.engine.connect() as conn:
        return [r._asdict() for r in conn.execute(select(artifacts))]


def main() -> None:
    parser = argparse.ArgumentParser(description="s3t training cost vs reference and plain fine-tune")
    parser.add_argument("--records", type=int, default=None, help="use only the first N training records")
    parser.add_argument("--plan", type=Path, default=None, help="plan TOML (default: the demo plan)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training.json"))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--plan-json", help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args.side, args.records, args.plan_json, args.side_out)
        return

    import s3t
    from s3t.demo import DEMO_PLAN

    plan = s3t.Plan.from_toml(args.plan) if args.plan else DEMO_PLAN
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in SIDES:
            side_out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, __file__, "--side", side, "--plan-json", plan.to_json(), "--side-out", str(side_out)]
            if args.records:
                cmd += ["--records", str(args.records)]
            subprocess.run(cmd, check=True)
            results[side] = json.loads(side_out.read_text())
            print(json.dumps(results[side]), flush=True)

    def ratio(a: str, b: str, key: str) -> float:
        return round(results[a][key] / results[b][key], 2)

    pairs = {"reference_over_s3t": ("reference", "s3t", ">= 3x"), "s3t_over_fine_tune": ("s3t", "fine-tune", "<= 3x"),
             "s3t_over_fine_tune_all_blocks": ("s3t", "fine-tune (all blocks)", "")}
    ratios = {name: {"wall_time": ratio(a, b, "seconds"), "cost_model": ratio(a, b, "block_examples")}
              for name, (a, b, _target) in pairs.items()}
    print(f"\n{'side':<23} {'seconds':>8} {'stages':>7} {'block-ex':>9} {'ex/s':>7} {'peak MB':>8} {'accuracy':>8}")
    for side, r in results.items():
        print(f"{side:<23} {r['seconds']:>8} {r['stages_trained']:>7} {r['block_examples']:>9} "
              f"{r['examples_per_s']:>7} {r['peak_rss_mb']:>8} {r['accuracy']:>8}")
    print()
    for name, (a, b, target) in pairs.items():
        print(f"{a} / {b}: {ratios[name]['wall_time']}x wall time{f' (target {target})' if target else ''}; "
              f"{ratios[name]['cost_model']}x block-examples")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sides": results, "ratios": ratios}, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
