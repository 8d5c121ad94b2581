"""Inference throughput with 4 shards at full depth: shared frozen trunk vs one full forward per shard.

    python benchmarks/inference_speed.py                    # demo plan with m = 4, 1,000 BBC texts
    python benchmarks/inference_speed.py --texts 200        # quicker

Weights come from a stub trainer (random adapters: inference cost does not depend on their values); the
two paths must give bit-identical probabilities, which the script asserts, so the speed-up costs no
accuracy by construction.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description="shared-trunk vs per-shard inference")
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inference.json"))
    args = parser.parse_args()

    import torch

    import s3t
    from s3t.demo import DEMO_PLAN, demo_data
    from s3t.inference import aggregate, shard_logits
    from stubs import use_random_weights

    def per_shard_logits(bb, components, texts, load, batch_size):
        """The baseline: every shard runs its own full forward from the embeddings."""
        out = np.zeros((len(components), len(texts), bb.num_outputs), dtype=np.float32)
        with torch.no_grad():
            for b in range(0, len(texts), batch_size):
                batch = bb.prepare(texts[b:b + batch_size])
                for k, c in enumerate(components):
                    for lineage in c["artifacts"]:
                        bb.load_state(load(lineage))
                    start = bb.group_start(c["depth"])
                    bb.set_active(0)
                    hidden = bb.run_blocks(bb.embed(batch), batch, 0, start)
                    bb.set_active(c["depth"])
                    out[k, b:b + batch_size] = bb.top(hidden, batch, start).numpy()
        bb.set_active(0)
        return out

    train, test = demo_data()
    texts = list((test.texts + train.texts)[:args.texts])
    plan = DEMO_PLAN.replace(num_shards=args.shards, budget=1)
    with tempfile.TemporaryDirectory() as tmp:
        system = s3t.S3T.create(Path(tmp) / "run", plan, train)
        use_random_weights(system)
        system.train(progress=False)
        trainer, (_, components) = system.trainer, system.served()
        assert len(components) == args.shards and all(c["depth"] == plan.num_slices for c in components)
        results = {}
        for name, fn in (("per_shard", per_shard_logits), ("shared_trunk", shard_logits)):
            fn(trainer.model, components, texts[:args.batch_size], load=trainer.load, batch_size=args.batch_size)
            started = time.perf_counter()
            logits = fn(trainer.model, components, texts, load=trainer.load, batch_size=args.batch_size)
            seconds = time.perf_counter() - started
            results[name] = {"seconds": round(seconds, 2), "texts_per_s": round(len(texts) / seconds, 1),
                             "proba": aggregate(logits, plan.aggregation)}
            print(name, results[name]["seconds"], "s", results[name]["texts_per_s"], "texts/s", flush=True)
        assert np.array_equal(results["per_shard"].pop("proba"), results["shared_trunk"].pop("proba"))
        system.close()
    ratio = round(results["per_shard"]["seconds"] / results["shared_trunk"]["seconds"], 2)
    print(f"shared trunk is {ratio}x the per-shard throughput (target >= 1.5x); outputs bit-identical")
    figures = {"plan": plan.to_dict(), "texts": len(texts), "results": results, "speedup": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
