"""Membership inference on the served model: can an attacker tell training records from never-seen ones,
before and after those records are deleted?

    python benchmarks/membership.py                  # BBC News: the demo plan, and a setting that memorises
    python benchmarks/membership.py --settings demo  # one of them
    python benchmarks/membership.py --smoke --base-model PATH   # synthetic data, tiny model: a check (tests)

Records (all from one split of the data; nothing here is chosen on the test split's labels):
- deleted (D): every training record of the data subjects placed in the slice that order 0 of each shard
  trains last. Deleting them truncates every shard to depth L-1, so the served model keeps serving (random
  records would take shards out after a handful of requests: see docs/results.md, capacity). One deletion
  request per subject, as data owners would send them.
- kept (K): a seeded sample of the other training records, as many as D: still in the served model after the
  deletion, a control showing the attack still finds members there.
- never seen (N): the held-out split; no model here ever trains on it.
- reference pool: the remaining training records; only the attacker's reference models train on them.

Models: the served S3T model before the deletion, after it, and after `restore()`; and a plain LoRA
fine-tune of the same blocks on all training records (`deletions.method_plans`' fine-tune: it cannot forget).

Attacks, each scoring every record (higher = "member"), with AUC of D vs N and K vs N, a stratified
bootstrap 95% interval, and the true-positive rate at 1% false positives:
- loss: the served model's log-probability of the true label (Yeom et al.: a loss threshold; the
  confidence threshold ranks records the same way);
- reference (offline LiRA with a global variance, in the spirit of Carlini et al. 2022): the target's
  logit-scaled confidence log(p / (1 - p)) minus its mean over `--shadows` reference models, plain
  fine-tunes on random halves of the reference pool (so every evaluated record is OUT for all of them).
  Not done: online LiRA (IN models per record: hundreds of trainings) and S3T-shaped reference models.

Writes benchmarks/results/membership/results.json and membership.png, and replaces the section between
the membership markers in docs/results.md (the rest of that file is left as it is).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import s3t
from s3t import Dataset, Plan

HERE = Path(__file__).resolve().parent
ATTACKS = ("loss", "reference")
BEGIN, END = "<!-- membership:begin -->", "<!-- membership:end -->"
MEMORISING_RECORDS, MEMORISING_EPOCHS = 600, 8
LOG_ODDS = 30.0   # |log(p / (1 - p))| is clipped here: a label a reference model never saw has p = 0


# -- statistics ------------------------------------------------------------------------------------------------
def auc(members: Sequence[float], others: Sequence[float]) -> float:
    """P(score of a random member > score of a random non-member), ties counting one half (Mann-Whitney)."""
    pos, neg = np.sort(np.asarray(members, float)), np.sort(np.asarray(others, float))
    if not len(pos) or not len(neg):
        raise ValueError("auc needs at least one member and one non-member score")
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def bootstrap_interval(members: Sequence[float], others: Sequence[float], *, resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC, resampling members and non-members separately (stratified)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(members, float), np.asarray(others, float)
    values = [auc(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))])
              for _ in range(resamples)]
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def roc(members: Sequence[float], others: Sequence[float]) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) of every threshold, from (0, 0) to (1, 1)."""
    scores = np.concatenate([members, others])
    is_member = np.concatenate([np.ones(len(members)), np.zeros(len(others))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]   # the last index of each distinct score
    tpr = np.r_[0, np.cumsum(is_member)[last] / len(members)]
    fpr = np.r_[0, np.cumsum(1 - is_member)[last] / len(others)]
    return fpr.tolist(), tpr.tolist()


def tpr_at(members: Sequence[float], others: Sequence[float], fpr: float) -> float:
    """Highest true-positive rate at a threshold whose false-positive rate is at most `fpr`."""
    f, t = roc(members, others)
    return max(tp for fp, tp in zip(f, t) if fp <= fpr)


# -- scores ----------------------------------------------------------------------------------------------------
def served_scores(system, data: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log p, log (1 - p), top label correct) per record, p the served model's probability of the true label.

    Computed in float64 from each served shard's logits, aggregated as the plan says ("mean_proba": the
    mean of the shards' softmax; "mean_logits": the softmax of their mean), because a confident model's
    float32 probabilities round to 1.0 and would tie members with never-seen records. A label the model
    never saw in training (a small reference model's sample may lack one) gets p = 0.
    """
    from scipy.special import log_softmax, logsumexp

    from s3t.inference import shard_logits

    _version, components = system.served()
    trainer = system.trainer
    logits = shard_logits(trainer.model, components, [r.model_input for r in data], load=trainer.load,
                          batch_size=64).astype(np.float64)   # (shards, records, labels)
    how = system.plan.aggregation
    if how == "mean_logits":
        logits = logits.mean(axis=0, keepdims=True)
    elif how != "mean_proba":
        raise s3t.PlanError(f"membership scores need `aggregation` 'mean_proba' or 'mean_logits'; got {how!r}")
    log_p = log_softmax(logits, axis=-1)
    column = {label: k for k, label in enumerate(system.labels)}
    truth = np.array([column.get(r.label, -1) for r in data])
    known = truth >= 0
    rows = np.arange(len(data))
    true = np.where(known, log_p[:, rows, np.maximum(truth, 0)], -np.inf)            # (shards, records)
    other = log_p.copy()
    other[:, rows[known], truth[known]] = -np.inf
    shards = np.log(len(log_p))
    log_true = logsumexp(true, axis=0) - shards
    log_rest = logsumexp(other, axis=(0, 2)) - shards
    correct = known & (logsumexp(log_p, axis=0).argmax(axis=1) == truth)
    return log_true, log_rest, correct


# -- the experiment --------------------------------------------------------------------------------------------
def split_records(train: Dataset, plan: Plan, *, seed: int) -> dict[str, list[str]]:
    """{"deleted", "kept", "pool"} ids, and the subjects whose deletion removes exactly "deleted"."""
    from s3t.orders import select_orders
    from s3t.partition import partition

    cells = partition(train, seed=plan.seed, num_shards=plan.num_shards, num_slices=plan.num_slices,
                      placement=plan.placement, risky_slices=plan.risky_slices, risk_threshold=plan.risk_threshold)
    last = {shard: select_orders(plan, shard)[0][-1] for shard in range(plan.num_shards)}
    deleted = sorted(i for i, (shard, slice_) in cells.items() if slice_ == last[shard])
    rest = sorted(set(train.ids) - set(deleted))
    kept = sorted(random.Random(seed).sample(rest, min(len(deleted), len(rest) // 2)))
    pool = sorted(set(rest) - set(kept))
    subjects = sorted({train.get(i).subject for i in deleted if train.get(i).subject is not None})
    return {"deleted": deleted, "kept": kept, "pool": pool, "subjects": subjects}


def run_setting(name: str, train: Dataset, test: Dataset, plan: Plan, *, shadows: int, work_dir: Path,
                seed: int = 0, restore: bool = True, resamples: int = 2000,
                log: Callable[[str], None] = print) -> dict:
    """Train, delete, restore, attack; return the figures of one setting as JSON-ready values."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import deletions   # beside this script: the fine-tune plan of the accuracy benchmark

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(label: str, since: float) -> None:
        timings[label] = round(time.perf_counter() - since, 1)
        log(f"[{name} {time.perf_counter() - started:7.1f} s] {label}: {timings[label]} s")

    groups = split_records(train, plan, seed=seed)
    sets = {"deleted": train.subset(groups["deleted"]), "kept": train.subset(groups["kept"]), "never seen": test}
    evaluated = Dataset.from_records([r for d in sets.values() for r in d])
    where = {key: slice(sum(len(d) for d in list(sets.values())[:k]), sum(len(d) for d in list(sets.values())[:k + 1]))
             for k, key in enumerate(sets)}
    log_p: dict[str, tuple[np.ndarray, np.ndarray]] = {}   # (log p, log (1 - p)) of the true label
    accuracy: dict[str, float] = {}   # on the never-seen records

    def score(model: str, system) -> None:
        *log_p[model], correct = served_scores(system, evaluated)
        accuracy[model] = float(correct[where["never seen"]].mean())

    t0 = time.perf_counter()
    system = s3t.S3T.create(work_dir / f"{name}-s3t", plan, train)
    system.train(progress=False)
    step("S3T training", t0)
    score("S3T before deletion", system)
    depth_before = [s.served_depth for s in system.status().shards]

    t0 = time.perf_counter()
    if groups["subjects"]:   # one request per data subject, as owners would send them
        receipts = [system.delete(subjects=[s], reference=f"membership benchmark: {s}") for s in groups["subjects"]]
    else:
        receipts = [system.delete(ids=groups["deleted"], reference="membership benchmark")]
    erased = sorted(i for r in receipts for i in r.deleted)
    if erased != groups["deleted"]:
        raise RuntimeError(f"the requests deleted {len(erased)} records, not the {len(groups['deleted'])} planned")
    step("deletion", t0)
    depth_after = [s.served_depth for s in system.status().shards]
    score("S3T after deletion", system)
    if restore:
        t0 = time.perf_counter()
        system.restore(progress=False)
        step("S3T restore", t0)
        score("S3T restored", system)
    system.close()

    t0 = time.perf_counter()
    fine_plan = deletions.method_plans(plan)[deletions.FINE_TUNE]
    fine = s3t.S3T.create(work_dir / f"{name}-fine-tune", fine_plan, train)
    fine.train(progress=False)
    score("plain fine-tune", fine)
    fine.close()
    step("fine-tune training", t0)

    t0 = time.perf_counter()
    pool = train.subset(groups["pool"])
    reference = []
    for k in range(shadows):   # each on a seeded random half of the pool: every evaluated record is OUT
        half = random.Random(seed * 1000 + k).sample(list(pool.ids), len(pool) // 2)
        shadow = s3t.S3T.create(work_dir / f"{name}-reference-{k}", fine_plan.replace(seed=fine_plan.seed + k + 1),
                                pool.subset(half))
        shadow.train(progress=False)
        true, rest, _correct = served_scores(shadow, evaluated)
        reference.append(np.clip(true - rest, -LOG_ODDS, LOG_ODDS))
        shadow.close()
    step(f"{shadows} reference models", t0)
    offset = np.mean(reference, axis=0) if reference else None

    rows, curves = [], {}
    for model, (true, rest) in log_p.items():
        scores = {"loss": true}
        if offset is not None:
            scores["reference"] = np.clip(true - rest, -LOG_ODDS, LOG_ODDS) - offset
        for attack, s in scores.items():
            never = s[where["never seen"]]
            for members in ("deleted", "kept"):
                m = s[where[members]]
                low, high = bootstrap_interval(m, never, resamples=resamples, seed=seed)
                rows.append({"model": model, "attack": attack, "members": members, "auc": auc(m, never),
                             "ci_low": low, "ci_high": high, "tpr_at_1pct_fpr": tpr_at(m, never, 0.01),
                             "n_members": int(len(m)), "n_never_seen": int(len(never))})
            curves[f"{model} | {attack}"] = roc(s[where["deleted"]], never)
    return {"setting": name, "plan": plan.to_dict(), "fine_tune_plan": fine_plan.to_dict(),
            "train_records": len(train), "test_records": len(test),
            "sizes": {k: len(v) for k, v in groups.items()}, "shadows": shadows,
            "served_depth_before": depth_before, "served_depth_after": depth_after,
            "deletion_requests": len(receipts), "rows": rows, "roc_deleted_vs_never_seen": curves,
            "accuracy_never_seen": accuracy,
            "mean_p_true": {model: {k: float(np.exp(true[w]).mean()) for k, w in where.items()}
                            for model, (true, _rest) in log_p.items()},
            "seconds": timings, "total_seconds": round(time.perf_counter() - started, 1)}


# -- outputs ---------------------------------------------------------------------------------------------------
def plot(results: Sequence[dict], path: Path) -> None:
    """Per setting: ROC of the loss attack (deleted vs never seen), and every AUC with its 95% interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4 * len(results)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 2, squeeze=False, width_ratios=(2, 3))
    for (left, right), res in zip(axes, results):
        models = list(dict.fromkeys(r["model"] for r in res["rows"]))
        for k, model in enumerate(models):
            fpr, tpr = res["roc_deleted_vs_never_seen"][f"{model} | loss"]
            left.plot(fpr, tpr, color=f"C{k}", label=model)
        left.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        left.set_xlabel("false-positive rate (never-seen records called members)")
        left.set_ylabel("true-positive rate (deleted set)")
        left.set_title(f"{res['setting']}: loss attack, deleted set vs never seen", fontsize=10)
        left.legend(fontsize=8, loc="lower right")
        left.grid(alpha=0.3)
        labels, values, errors, colors = [], [], [], []
        for row in res["rows"]:
            labels.append(f"{row['model']}\n{row['attack']}, {row['members']}")
            values.append(row["auc"])
            errors.append((row["auc"] - row["ci_low"], row["ci_high"] - row["auc"]))
            # The deleted set in full colour, the kept control paler.
            colors.append(to_rgba(f"C{models.index(row['model'])}", 0.9 if row["members"] == "deleted" else 0.4))
        y = np.arange(len(values))[::-1]
        right.barh(y, np.array(values) - 0.5, left=0.5, color=colors, xerr=np.array(errors).T, capsize=2)
        right.axvline(0.5, color="black", linewidth=1)
        right.set_yticks(y, labels, fontsize=6.5)
        right.set_xlabel("AUC (0.5: members indistinguishable from never-seen records), 95% bootstrap interval")
        right.set_title(f"{res['setting']}: AUC vs never-seen records ({res['sizes']['deleted']} deleted, "
                        f"{res['sizes']['kept']} kept, {res['test_records']} never seen)", fontsize=10)
        right.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=100)


def _auc(row: dict) -> str:
    return f"{row['auc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def markdown(payload: dict, *, png: str, raw: str) -> str:
    """The docs/results.md section, with the figures of `payload` and a reading computed from them."""
    lines = [BEGIN, "", "## Membership inference before and after deletion", "",
             f"Generated by `benchmarks/membership.py` (s3t {payload['s3t_version']}) in "
             f"{payload['total_seconds'] / 60:.1f} minutes on {payload['machine']['cpu_count']} cores (load "
             f"average {payload['machine']['load_average_1m']} at the start, {payload['load_average_end']} at the "
             "end: the machine was shared). Figures are deterministic under the seeds; rerun to reproduce:", "",
             "```bash", payload["command"], "```", "",
             "How it is set up (the script's docstring has the details): the attacker scores every record and "
             "we report the AUC of separating a set of records from never-seen records (the held-out split), with "
             "a stratified bootstrap 95% interval and the true-positive rate at 1% false positives. **deleted**: "
             "every training record of the data subjects placed in the slice that order 0 of each shard trains "
             "last, deleted by one request per subject (the served model then serves depth L-1 in every shard); "
             "**kept**: as many other training records, still in the model (the control). Attacks: **loss** "
             "(log-probability of the true label, a threshold attack) and **reference** (offline LiRA with a global "
             "variance: the logit-scaled confidence minus its mean over reference models, plain fine-tunes on "
             "random halves of the remaining training records, which never include an evaluated record). "
             "The plain fine-tune trains the same blocks on all training records and cannot forget.", "",
             f"![membership inference]({png})", ""]
    for res in payload["results"]:
        p = res["plan"]
        lines += [f"### Setting `{res['setting']}`", "",
                  f"{res['description']}: {res['train_records']} training records (m={p['num_shards']}, "
                  f"L={p['num_slices']}, B={p['budget']}, {p['epochs']} epoch(s), learning rate {p['learning_rate']}), "
                  f"{res['sizes']['deleted']} deleted by {res['deletion_requests']} subject requests, "
                  f"{res['sizes']['kept']} kept, {res['test_records']} never seen, {res['shadows']} reference models. "
                  f"Served depth per shard: {res['served_depth_before']} before the deletion, "
                  f"{res['served_depth_after']} after it. Wall time {res['total_seconds'] / 60:.1f} min "
                  f"({', '.join(f'{k} {v:.0f} s' for k, v in res['seconds'].items())}).", "",
                  "| model | attack | deleted vs never seen: AUC [95% CI] | TPR at 1% FPR | kept vs never seen: AUC [95% CI] |",
                  "|---|---|---|---|---|"]
        by = {(r["model"], r["attack"], r["members"]): r for r in res["rows"]}
        for model, attack in dict.fromkeys((r["model"], r["attack"]) for r in res["rows"]):
            d, k = by[(model, attack, "deleted")], by[(model, attack, "kept")]
            lines.append(f"| {model} | {attack} | {_auc(d)} | {d['tpr_at_1pct_fpr']:.3f} | {_auc(k)} |")
        lines += ["", *reading(res), ""]
    lines += [f"Raw data: [`results.json`]({raw}).", "", END]
    return "\n".join(lines) + "\n"


def reading(res: dict) -> list[str]:
    """What the intervals say, stated from the figures (so a rerun cannot leave a stale sentence behind)."""
    by = {(r["model"], r["attack"], r["members"]): r for r in res["rows"]}

    def holds(row: dict) -> bool:
        return row["ci_low"] <= 0.5 <= row["ci_high"]

    out = []
    for attack in ATTACKS:
        before = by.get(("S3T before deletion", attack, "deleted"))
        if before is None:
            continue
        after, kept = by[("S3T after deletion", attack, "deleted")], by[("S3T after deletion", attack, "kept")]
        fine = by[("plain fine-tune", attack, "deleted")]
        found = "finds them (interval above 0.5)" if before["ci_low"] > 0.5 else \
            "cannot tell them from never-seen records either (interval contains 0.5): there is little to find"
        out.append(f"- {attack} attack: before the deletion, on the records about to be deleted, it {found}, "
                   f"AUC {_auc(before)}; after the deletion {_auc(after)}: "
                   + ("0.5 lies inside the interval" if holds(after) else "**0.5 lies outside the interval**")
                   + f"; on the kept records after the deletion {_auc(kept)}; the plain fine-tune {_auc(fine)}.")
        restored = by.get(("S3T restored", attack, "deleted"))
        if restored is not None:
            out.append(f"  After `restore()` the deleted records score {_auc(restored)}"
                       + (" (0.5 inside the interval)." if holds(restored) else " (**0.5 outside the interval**)."))
    return out


def splice(report: Path, section: str) -> None:
    """Replace the membership section of `report` (or append it), leaving the rest of the file untouched."""
    text = report.read_text(encoding="utf-8") if report.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    report.write_text(text, encoding="utf-8")


def write_outputs(payload: dict, out_dir: Path, report: Path, *, raw: Path) -> None:
    """The plot in `out_dir`, and the section in `report` (linking the plot and the raw JSON at `raw`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(payload["results"], out_dir / "membership.png")
    report.parent.mkdir(parents=True, exist_ok=True)
    splice(report, markdown(payload, png=os.path.relpath(out_dir / "membership.png", report.parent),
                            raw=os.path.relpath(raw, report.parent)))


# -- command line ----------------------------------------------------------------------------------------------
def settings(args) -> list[tuple[str, str, Dataset, Dataset, Plan]]:
    """(name, description, train, test, plan) of each setting asked for."""
    from s3t.demo import DEMO_PLAN, demo_data

    if args.smoke:
        data = s3t.datasets.synthetic(96, num_labels=3, num_subjects=24, seed=1)
        train, test = data.split(test_fraction=0.25, seed=0)
        plan = Plan(num_shards=2, num_slices=2, budget=2, epochs=1, max_length=24, batch_size=8,
                    learning_rate=5e-3, base_model=args.base_model, seed=0)
        return [("smoke", "synthetic records on the given model (a check, not a measurement)", train, test, plan)]
    train, test = demo_data()
    plan = DEMO_PLAN if args.base_model is None else DEMO_PLAN.replace(base_model=args.base_model)
    small = train.subset(random.Random(args.seed).sample(list(train.ids), MEMORISING_RECORDS))
    every = {"demo": ("BBC News, `s3t.demo.demo_data()`, the demo plan (`s3t demo`, README)", train, test, plan),
             "memorising": (f"a seeded sample of {MEMORISING_RECORDS} BBC News training records, the demo plan "
                            f"with {MEMORISING_EPOCHS} epochs: fewer records seen more often, so that there is "
                            "something to find", small, test, plan.replace(epochs=MEMORISING_EPOCHS))}
    return [(name, *every[name]) for name in args.settings]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Membership inference before and after deletion")
    parser.add_argument("--settings", nargs="+", choices=("demo", "memorising"), default=["demo", "memorising"],
                        help="BBC News settings to run (default both)")
    parser.add_argument("--shadows", type=int, help="reference models per setting (default 4; --smoke 2)")
    parser.add_argument("--resamples", type=int, help="bootstrap resamples (default 2000; --smoke 200)")
    parser.add_argument("--no-restore", action="store_true", help="skip restore() and its scores")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and reference-model halves")
    parser.add_argument("--base-model", help="local Hugging Face folder (default: the embedded MiniLM-L6)")
    parser.add_argument("--smoke", action="store_true", help="96 synthetic records, 2 reference models: a check")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results/membership")
    parser.add_argument("--report", type=Path, help="markdown file whose membership section is replaced "
                                                    "(default docs/results.md; --smoke: OUT_DIR/results.md)")
    parser.add_argument("--from-json", type=Path, help="redraw the plot and section from this results.json "
                                                       "(no training)")
    args = parser.parse_args(argv)
    if args.smoke and args.base_model is None:
        parser.error("--smoke needs --base-model (a small local model, such as the tests' 2-block MiniLM)")
    shadows = args.shadows if args.shadows is not None else (2 if args.smoke else 4)
    resamples = args.resamples or (200 if args.smoke else 2000)
    if shadows < 0 or resamples < 1:
        parser.error("--shadows must be >= 0 and --resamples >= 1")
    out_dir = args.out_dir or HERE / "results" / ("membership-smoke" if args.smoke else "membership")
    report = args.report or (out_dir / "results.md" if args.smoke else HERE.parent / "docs" / "results.md")
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        write_outputs(payload, out_dir, report, raw=args.from_json)
        return payload
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    import deletions_report

    command = " ".join(["python", "benchmarks/membership.py", *(sys.argv[1:] if argv is None else argv)])
    machine = deletions_report.machine_facts()
    started = time.perf_counter()
    results = []
    for name, description, train, test, plan in settings(args):
        print(f"{name}: {len(train)} train / {len(test)} test records; {plan!r}", flush=True)
        work = Path(tempfile.mkdtemp(prefix=f"s3t-membership-{name}-"))
        try:
            res = run_setting(name, train, test, plan, shadows=shadows, work_dir=work, seed=args.seed,
                              restore=not args.no_restore, resamples=resamples,
                              log=lambda m: print(m, flush=True))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        res["description"] = description
        results.append(res)
    payload = {"command": command, "machine": machine, "load_average_end": round(os.getloadavg()[0], 2),
               "total_seconds": round(time.perf_counter() - started, 1), "s3t_version": s3t.__version__,
               "seed": args.seed, "resamples": resamples, "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")   # keeps the phases in order
    write_outputs(payload, out_dir, report, raw=out_dir / "results.json")
    for res in results:
        for line in reading(res):
            print(f"{res['setting']}: {line.strip()}")
    print(f"done in {payload['total_seconds']:.0f} s; results in {out_dir}, section in {report}", flush=True)
    return payload


if __name__ == "__main__":
    main()
