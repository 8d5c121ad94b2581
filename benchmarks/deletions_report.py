"""Outputs of `deletions.py`: CSV + JSON, three PNG plots and the markdown report, from its results dict.

Kept apart from the experiment so that `deletions.run_experiment` stays importable without matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from s3t import Dataset, Plan

FINE_TUNE, SISA, RETRAIN = "fine-tune", "SISA", "full retrain"
HOT = "hot subjects"
PRIOR_SELECTIONS = ("bms", "prior_aware")   # compared with cyclic at B = L


# -- facts and simulation -------------------------------------------------------------------------------------
def machine_facts() -> dict:
    """Cores, CPU model, load, and the versions that decide wall times and bit-exact results."""
    import numpy
    import torch
    import transformers

    import s3t

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "s3t": s3t.__version__}


def plan_toml(plan: Plan) -> str:
    """The plan as a TOML file for `--plan` (fields left at None are the defaults and are omitted)."""
    lines = ["[plan]"]
    for key, value in plan.to_dict().items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")   # JSON scalars and lists are valid TOML here
    return "\n".join(lines) + "\n"


def simulate_capacity(plan: Plan, train: Dataset, *, trials: int, seed: int, hot: tuple[float, float]) -> list[dict]:
    """Simulated deletion capacity under both request models of the experiment: cyclic selection for
    B = 1..L, and BMS and prior-aware placement at B = L (each informed by the request model's prior)."""
    from s3t.capacity import Requests, expected_capacity, simulate

    subjects = len({r.subject for r in train})
    models = {"uniform records": Requests(distribution="uniform", population=len(train)),
              HOT: Requests(distribution="hot", population=subjects, hot_fraction=hot[0], hot_share=hot[1])}
    L = plan.num_slices
    base = plan.replace(method="s3t", selection="cyclic", deletion_prior=None, placement="hash")
    configs = [("cyclic", b) for b in range(1, L + 1)] + [(sel, L) for sel in PRIOR_SELECTIONS]
    rows = []
    for selection, budget in configs:
        # BMS without a deletion_prior gets the one the requests imply (as `simulate` documents).
        p = base.replace(budget=budget, **({"placement": "prior_aware"} if selection == "prior_aware"
                                           else {"selection": selection}))
        for name, requests in models.items():
            summary = simulate(p, requests=requests, trials=trials, seed=seed).summary()
            rows.append({"selection": selection, "budget": budget, "requests": name, "trials": trials,
                         "closed_form_cells": round(expected_capacity(p.num_shards, p.num_slices, budget), 2),
                         **{f"{event}_{stat}": summary[event][stat] for event in ("first_death", "all_dead")
                            for stat in ("mean", "p05", "p95")}})
    return rows


# -- summaries ------------------------------------------------------------------------------------------------
def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def methods_of(results: dict, seq: str | None = None) -> list[str]:
    """Methods that handle deletions (those replayed on `seq`, if given), in plan order, full retrain last."""
    replayed = results.get("sequences_of", {})
    return [m for m in [*results["plans"], RETRAIN]
            if m != FINE_TUNE and (seq is None or seq in replayed.get(m, [seq]))]


def _plain_budget(method: str) -> int | None:
    """B of a plain "S3T B=b" method (cyclic, hash placement), else None."""
    head, _, b = method.partition("S3T B=")
    return int(b) if not head and b.isdigit() else None


def _capacity(results: dict, seq: str, budget: int, selection: str = "cyclic") -> dict | None:
    """The simulated capacity row of (sequence, budget, selection), if simulated."""
    return next((c for c in results["capacity"] if c["selection"] == selection
                 and c["budget"] == budget and c["requests"] == seq), None)


def latency_summary(results: dict) -> list[dict]:
    """Per sequence and method: median / p90 / max latency, mean retraining work, deletions until no live shard."""
    rows = []
    for seq in results["sequences"]:
        for method in methods_of(results, seq):
            mine = [r for r in results["requests"] if r["sequence"] == seq and r["method"] == method]
            lat = [r["latency_ms"] for r in mine]
            # Only S3T can go dark: the others retrain (full retrain serves nothing between its checkpoints).
            dark = next((r["request"] for r in mine if r["live_shards"] == 0), None) if "S3T" in method else None
            rows.append({"sequence": seq, "method": method, "requests": len(mine),
                         "median_ms": _quantile(lat, 0.5), "p90_ms": _quantile(lat, 0.9), "max_ms": max(lat),
                         "mean_retrain_stage_examples": sum(r["retrain_stage_examples"] for r in mine) / len(mine),
                         "records_deleted": sum(r["records_deleted"] for r in mine),
                         "no_live_shard_after": dark})
    return rows


def headline(results: dict) -> dict:
    """S3T (B = L) vs SISA median latency, and accuracy at 0 / 25% / 50% of the simulated capacity."""
    L = results["plan"]["num_slices"]
    budget = max(b for b in map(_plain_budget, results["plans"]) if b and b <= L)
    top = f"S3T B={budget}"
    lat = {(r["sequence"], r["method"]): r["median_ms"] for r in latency_summary(results)}
    out = {"s3t": top, "latency_ratio": {}, "accuracy_at_capacity": {}}
    for seq in results["sequences"]:
        out["latency_ratio"][seq] = round(lat[(seq, SISA)] / lat[(seq, top)], 1) if lat[(seq, top)] else None
        cap = (_capacity(results, seq, budget) or {}).get("all_dead_mean")
        if cap is None:
            continue
        points = {}
        for share in (0.0, 0.25, 0.5):
            rows = [r for r in results["accuracy"] if r["sequence"] == seq and r["method"] != FINE_TUNE]
            steps = sorted({r["deletions"] for r in rows})
            t = min(steps, key=lambda d: abs(d - share * cap))
            reached = share * cap <= steps[-1] + 0.5 * results["every"]
            points[f"{share:.0%}"] = {"deletions": t, "reached": reached,
                                      **{r["method"]: r["accuracy"] for r in rows if r["deletions"] == t}}
        out["accuracy_at_capacity"][seq] = {"capacity": round(cap, 1), "points": points}
    out["prior"] = prior_summary(results, budget)
    return out


def prior_summary(results: dict, budget: int) -> dict | None:
    """Under the skewed prior: simulated capacity of BMS and prior-aware placement over cyclic at B = L, and
    the hot sequence's accuracy for the three (None when the run has no prior study)."""
    names = {"cyclic": f"S3T B={budget}", "bms": f"S3T B={budget} BMS", "prior_aware": f"S3T B={budget} prior-aware"}
    if not all(n in results["plans"] for n in names.values()):
        return None
    capacity = {}
    for seq in results["sequences"]:
        rows = {sel: _capacity(results, seq, budget, sel) for sel in names}
        if all(rows.values()):
            cyclic = rows["cyclic"]["all_dead_mean"]
            capacity[seq] = {sel: {"all_dead": round(r["all_dead_mean"], 1),
                                   "first_death": round(r["first_death_mean"], 1),
                                   "gain_all_dead": round(r["all_dead_mean"] / cyclic, 2)} for sel, r in rows.items()}
    accuracy = {}
    for r in results["accuracy"]:
        if r["sequence"] == HOT and r["method"] in names.values():
            accuracy.setdefault(r["deletions"], {})[r["method"]] = r["accuracy"]
    return {"methods": names, "capacity": capacity, "accuracy": accuracy}


# -- files ----------------------------------------------------------------------------------------------------
def write_all(results: dict, *, out_dir: Path, report_path: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["latency_summary"] = latency_summary(results)
    results["headline"] = headline(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    for name, rows in (("training", results["training"]), ("accuracy", results["accuracy"]),
                       ("requests", results["requests"]), ("capacity", results["capacity"]),
                       ("latency", results["latency_summary"])):
        _csv(out_dir / f"{name}.csv", rows)
    plot_accuracy(results, out_dir / "accuracy.png")
    plot_latency(results, out_dir / "latency.png")
    plot_capacity(results, out_dir / "capacity.png")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(markdown(results, out_dir=out_dir, report_path=report_path))


def _csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else (json.dumps(r[k]) if isinstance(r.get(k), list)
                                                              else r[k]) for k in fields})


def _figure(width: float, height: float, cols: int = 1):
    # The Figure API with an explicit Agg canvas, as s3t.capacity.plot does: no pyplot, no global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def plot_accuracy(results: dict, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    seqs = list(results["sequences"])
    fig, axes = _figure(5.6 * len(seqs), 4.2, len(seqs))
    fine = next((t["accuracy"] for t in results["training"] if t["method"] == FINE_TUNE), None)
    everyone = methods_of(results)   # one colour per method across panels
    for ax, seq in zip(axes, seqs):
        for method in methods_of(results, seq):
            k = everyone.index(method)
            rows = [r for r in results["accuracy"] if r["sequence"] == seq and r["method"] == method]
            x = [r["deletions"] for r in rows]
            y = [math.nan if r["accuracy"] is None else r["accuracy"] for r in rows]
            ax.plot(x, y, marker="osD^v*"[k % 6], markersize=4, color=f"C{k}", label=method)   # overlaps stay visible
            dark = [r["deletions"] for r in rows if r["accuracy"] is None]
            if dark:   # missing accuracy: mark where the system went dark, along the bottom edge
                ax.plot(dark, [0.0] * len(dark), linestyle="none", marker="x", color=f"C{k}", clip_on=False)
        if fine is not None:
            ax.axhline(fine, color="black", linestyle="--", linewidth=1, label=f"{FINE_TUNE} (no deletions)")
        ax.set_ylim(0.0, 1.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{seq}: × = no live shard (accuracy missing)", fontsize=10)
        ax.set_xlabel("deletion requests")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")   # per panel: methods differ between sequences
    fig.suptitle(f"Accuracy under deletion ({results['test_records']} held-out records)", fontsize=11)
    fig.savefig(path, dpi=110)


def plot_latency(results: dict, path: Path) -> None:
    methods, seqs = methods_of(results), list(results["sequences"])
    fig, axes = _figure(1.3 * len(methods) + 2.5, 4.2)
    ax = axes[0]
    for j, seq in enumerate(seqs):
        offset = (j - (len(seqs) - 1) / 2) * 0.3
        for i, method in enumerate(methods):
            lat = [r["latency_ms"] for r in results["requests"] if r["sequence"] == seq and r["method"] == method]
            if not lat:   # not replayed on this sequence
                continue
            spread = [(k / max(len(lat) - 1, 1) - 0.5) * 0.2 for k in range(len(lat))]   # fixed jitter
            ax.scatter([i + offset + s for s in spread], lat, s=10, color=f"C{j}", alpha=0.7,
                       label=seq if i == 0 else None)
            ax.plot([i + offset - 0.13, i + offset + 0.13], [_quantile(lat, 0.5)] * 2, color="black", linewidth=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(methods)), methods, fontsize=8, rotation=20, ha="right")
    ax.set_ylabel("deletion latency per request (ms, log scale)")
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=8)
    ax.set_title("Request to serving a model without the data (bar: median)", fontsize=10)
    fig.savefig(path, dpi=110)


def plot_capacity(results: dict, path: Path) -> None:
    cap, plan = results["capacity"], results["plan"]
    fig, axes = _figure(10.0, 4.6)
    ax = axes[0]
    budgets = sorted({c["budget"] for c in cap})
    ax.plot(budgets, [next(c["closed_form_cells"] for c in cap if c["budget"] == b) for b in budgets],
            color="black", linestyle=":", label="closed form m·L·H(m·B), all shards dead")
    for j, seq in enumerate(results["sequences"]):
        rows = [_capacity(results, seq, b) for b in budgets]
        ax.errorbar(budgets, [r["all_dead_mean"] for r in rows], color=f"C{j}", marker="o", capsize=3,
                    yerr=[[r["all_dead_mean"] - r["all_dead_p05"] for r in rows],
                          [r["all_dead_p95"] - r["all_dead_mean"] for r in rows]],
                    label=f"simulated, {seq}: all shards dead (mean, 5–95%)")
        ax.plot(budgets, [r["first_death_mean"] for r in rows], color=f"C{j}", linestyle="--",
                label=f"simulated, {seq}: first shard dead (mean)")
        for k, (marker, sel) in enumerate(zip("*D", PRIOR_SELECTIONS)):   # the others at B = L, same prior
            other = _capacity(results, seq, budgets[-1], sel)
            if other:
                ax.plot([budgets[-1] + 0.15 * (k + 1)], [other["all_dead_mean"]], marker=marker, markersize=9,
                        color=f"C{j}", linestyle="none", label=f"simulated, {seq}: {sel} B={budgets[-1]}, all dead")
        for r in (s for s in latency_summary(results) if s["sequence"] == seq and _plain_budget(s["method"])):
            b = _plain_budget(r["method"])
            survived = r["no_live_shard_after"] is None
            ax.plot([b + 0.06 * (2 * j - 1)], [r["requests"] if survived else r["no_live_shard_after"]],
                    marker="^" if survived else "s", color=f"C{j}", markeredgecolor="black", linestyle="none")
    ax.plot([], [], marker="s", color="grey", markeredgecolor="black", linestyle="none",
            label="this run: no live shard after (▲ = still serving at the end)")
    ax.set_xticks(budgets)
    ax.set_xlabel("budget B (orders per shard; B = 1 is SISA without retraining)")
    ax.set_ylabel("deletion requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"Deletion capacity vs budget, m={plan['num_shards']}, L={plan['num_slices']} "
                 f"({cap[0]['trials']} trials)", fontsize=10)
    fig.savefig(path, dpi=110)


# -- the report -----------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict, *, out_dir: Path, report_path: Path) -> str:
    rel = lambda name: os.path.relpath(out_dir / name, report_path.parent)   # noqa: E731
    plan, machine, head = results["plan"], results["machine"], results["headline"]
    parts = [
        "# Accuracy under deletion: S3T vs SISA vs full retraining",
        "",
        f"Generated by `benchmarks/deletions.py` (s3t {results['s3t_version']}) in {results['total_seconds'] / 60:.1f} "
        f"minutes. Every figure below comes from that one run; rerun the command to reproduce it (accuracies "
        "are deterministic under the seed; wall times depend on the machine and its load).",
        "",
        "```bash", results["command"], "```",
        "",
        "## Setup",
        "",
        f"- **Data**: {results['data']}: {results['train_records']} training / {results['test_records']} held-out "
        "test records. The test split is used only to measure accuracy, never for a choice.",
        f"- **Requests**: two sequences of {results['requests_per_sequence']} requests, the same for every method: "
        "`uniform records` deletes one training record at a time, uniformly without replacement; `hot subjects` "
        "deletes whole data subjects, where 10% of the subjects send 50% of the requests (the capacity "
        f"simulator's `hot` model). Seed {results['seed']}. Accuracy is measured after every {results['every']} "
        "requests.",
        f"- **Machine**: {machine['cpu_count']} cores ({machine['cpu_model']}), torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, Python {machine['python']}; "
        f"load average {machine['load_average_1m']} at the start and {machine.get('load_average_1m_end', '?')} at the "
        "end (other work on the machine inflates wall times).",
        "",
        "The S3T plan (`--plan` file format):",
        "", "```toml", results["plan_toml"].rstrip(), "```", "",
        "Methods, all on the s3t engine with the plan's shards, slices, LoRA and optimiser:",
        "",
        f"- **{FINE_TUNE}**: one LoRA fine-tune on all the data (m=1, L=1, one group over every block S3T "
        "adapts): the reference for \"near full training\". It cannot forget, so it is measured before deletions.",
        f"- **{SISA}**: `method=\"sisa\"`, one order per shard, one LoRA group over all adapted blocks trained slice "
        "by slice with a checkpoint per slice. Every deletion is followed at once by `restore()`, which retrains "
        "the hit shard from its last clean checkpoint; its latency is delete + restore wall time.",
        "- **S3T B=b**: b orders per shard (cyclic). A deletion only truncates orders and switches the served "
        "set; its latency is the receipt's `duration_ms`. No training.",
        "- **S3T B=L BMS** and **S3T B=L prior-aware** (hot subjects only): the same budget, trained knowing the "
        "skewed model's prior. BMS chooses orders from each slice's share of the request weight; prior-aware "
        "placement puts the records of subjects more likely than average to be deleted (risk = w / (w + mean w) "
        "> 0.5, i.e. the hot subjects) in the last slice of their shard, which every order trains last.",
        f"- **{RETRAIN}**: the fine-tune retrained from scratch on the reduced data. **To stay within the "
        f"time budget it is retrained only at the evaluation checkpoints (every {results['every']} requests); each "
        "request is charged the retrain time measured at the next checkpoint** (plus its own delete time) as "
        "its latency, and that retrain's stage-examples as its retraining work.",
        "",
        "## Offline training cost",
        "",
        "Stage-examples: examples seen by all trained stages (× epochs); block-examples also count the "
        "transformer blocks each stage runs forward and backward (S3T stage i runs i groups; SISA and the "
        "fine-tune run every adapted block). Stages shared by several orders are trained once.",
        "",
        _table(["method", "wall time", "stage-examples", "block-examples", "accuracy (0 deletions)"],
               [[t["method"], f"{t['seconds']:.1f} s", t["stage_examples"], t["block_examples"],
                 _fmt(t["accuracy"])] for t in results["training"]]),
        "",
        "## Accuracy under deletion",
        "",
        f"![accuracy vs deletions]({rel('accuracy.png')})",
        "",
    ]
    for seq in results["sequences"]:
        methods = methods_of(results, seq)
        rows = [r for r in results["accuracy"] if r["sequence"] == seq and r["method"] != FINE_TUNE]
        steps = sorted({r["deletions"] for r in rows})
        value = {(r["deletions"], r["method"]): r for r in rows}
        cell = lambda r: "—" if r is None else ("no live shard" if r["accuracy"] is None   # noqa: E731
                                                else _fmt(r["accuracy"]))
        parts += [f"**{seq}** (held-out accuracy after n requests; \"no live shard\" = missing: the system "
                  "serves nothing until restored):", "",
                  _table(["n", *methods], [[t, *(cell(value.get((t, m))) for m in methods)] for t in steps]), ""]
    parts += [
        "## Deletion latency and retraining work",
        "",
        f"![deletion latency]({rel('latency.png')})",
        "",
        _table(["sequence", "method", "median latency", "p90", "max", "retraining per request (stage-examples)",
                "records deleted", "no live shard after request"],
               [[r["sequence"], r["method"], _ms(r["median_ms"]), _ms(r["p90_ms"]), _ms(r["max_ms"]),
                 f"{r['mean_retrain_stage_examples']:.0f}", r["records_deleted"],
                 ("n/a (retrains)" if not r["method"].startswith("S3T") else "still serving at the end"
                  if r["no_live_shard_after"] is None else r["no_live_shard_after"])]
                for r in results["latency_summary"]]),
        "",
        "## Deletion capacity vs budget",
        "",
        "Simulated with `s3t.capacity.simulate` (the engine's own truncation and serving rules) for this plan "
        "and both request models, next to the closed form and to what this run observed. BMS and prior-aware "
        "placement get the prior of the request model they are simulated under; under uniform requests every "
        "record's risk is 0.5, so prior-aware placement moves nothing and equals cyclic.",
        "",
        f"![capacity vs budget]({rel('capacity.png')})",
        "",
        _table(["selection", "B", "requests", "closed form (cells)", "first shard dead (mean)",
                "all shards dead (mean)", "all dead 5–95%"],
               [[c["selection"], c["budget"], c["requests"], _fmt(c["closed_form_cells"], 1),
                 _fmt(c["first_death_mean"], 1), _fmt(c["all_dead_mean"], 1), f"{_fmt(c['all_dead_p05'], 0)}–{_fmt(c['all_dead_p95'], 0)}"]
                for c in results["capacity"]]),
        "",
    ]
    parts += _prior_section(head.get("prior"))
    parts += ["## Headline figures", ""]
    for seq, ratio in head["latency_ratio"].items():
        parts.append(f"- {seq}: the median deletion latency of {SISA} (delete + restore) is **{ratio:,.0f}×** "
                     f"that of {head['s3t']} (request to serving a model without the data).")
    if head.get("prior") and HOT in head["prior"]["capacity"]:
        cap = head["prior"]["capacity"][HOT]
        parts.append(f"- {HOT}: prior-aware placement absorbs **{cap['prior_aware']['gain_all_dead']:.2f}×** the "
                     "requests of cyclic selection before every shard is dead "
                     f"(BMS: {cap['bms']['gain_all_dead']:.2f}×), simulated at the same budget.")
    parts.append("")
    for seq, info in head["accuracy_at_capacity"].items():
        methods = methods_of(results, seq)
        parts += [f"**{seq}**: held-out accuracy at 0 / 25% / 50% of {head['s3t']}'s simulated capacity "
                  f"(mean requests until no shard is live: {info['capacity']}), at the nearest checkpoint n:", "",
                  _table(["share of capacity", "n", *methods],
                         [[share, f"{p['deletions']}" + ("" if p["reached"] else " (run too short)"),
                           *("no live shard" if m in p and p[m] is None else _fmt(p.get(m)) for m in methods)]
                          for share, p in info["points"].items()]), ""]
    parts += ["Raw data: " + ", ".join(f"[`{n}`]({rel(n)})" for n in (
        "results.json", "training.csv", "accuracy.csv", "requests.csv", "latency.csv", "capacity.csv")) + ".", ""]
    return "\n".join(parts)


def _prior_section(prior: dict | None) -> list[str]:
    """Report section: BMS and prior-aware placement against cyclic at B = L, capacity and accuracy."""
    if not prior:
        return []
    names = prior["methods"]
    parts = ["## Prior-aware placement under the skewed prior", "",
             "Simulated capacity (mean requests until the first shard / every shard is dead) and the gain over "
             "cyclic selection at the same budget. Prior-aware placement keeps the last `risky_slices` of each "
             "shard for risky data, so its gain grows with L (run `s3t simulate --selection prior_aware "
             "--distribution hot` for larger plans; README, Capacity):", "",
             _table(["requests", *names.values()],
                    [[seq, *(f"{c[sel]['first_death']} / {c[sel]['all_dead']} ({c[sel]['gain_all_dead']:.2f}×)"
                             for sel in names)] for seq, c in prior["capacity"].items()]),
             "", f"Held-out accuracy on the {HOT} sequence (the three were trained on the same data):", "",
             _table(["n", *names.values()],
                    [[n, *("no live shard" if row.get(m, 0) is None else _fmt(row.get(m)) for m in names.values())]
                     for n, row in sorted(prior["accuracy"].items())]), ""]
    return parts
