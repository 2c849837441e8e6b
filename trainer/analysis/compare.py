"""`hashmoe compare RUN_DIR...`: one markdown table (report.md, also printed) and PNG plots comparing run
folders written by `hashmoe train`. Runs are labelled by the config keys whose values differ between them.
Broken inputs (missing folder, no metrics, unfinished run, no evaluation) become a status and a note, not a crash.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.analysis.seed_groups import final_of, group_by_seed, ordering_table, seed_bands, seed_table
from trainer.errors import UserError
from trainer.run import checkpoint as ckpt
from trainer.run.config import flatten_config
from trainer.run.metrics import read_metrics

PLOTS = {"valid_ppl_vs_step.png": "valid ppl vs step", "valid_ppl_vs_time.png": "valid ppl vs training time",
         "valid_ppl_vs_flops.png": "valid ppl vs training FLOPs", "updates_per_sec.png": "updates per second",
         "expert_load.png": "final expert load per MoE layer",
         "final_vs_params.png": "final validation result vs trainable params, total params and compute"}
SEED_PLOT = ("valid_ppl_across_seeds.png", "valid ppl across seeds: mean, band from the lowest to the highest seed")
IGNORED_KEYS = {"run.name", "run.output_dir"}  # always differ between runs, say nothing about them
# Model keys that mean nothing for a dense model: pruned so a dense baseline is labelled by moe_layers alone.
MOE_ONLY_KEYS = {"num_experts", "expert_intermediate_size", "router", "num_experts_per_tok", "capacity_factor",
                 "eval_capacity_factor", "router_aux_loss_coef", "router_z_loss_coef", "router_jitter",
                 "router_init_scale", "base_centroid_gain", "output_router_logits", "router_bias_update_rate",
                 "num_shared_experts", "scoring_func", "norm_topk_prob", "routed_scaling_factor"}
HASH_ONLY_KEYS = {"hash_function", "hash_heads", "hash_seed", "hash_gate", "hash_experts_per_tok"}
# Model keys a router never reads: pruned so its label names only what shapes it (a hash run has no balance loss).
LEARNED_ROUTER_KEYS = {"capacity_factor", "eval_capacity_factor", "router_aux_loss_coef", "router_z_loss_coef",
                       "router_jitter", "router_bias_update_rate"}
UNREAD_KEYS = {"hash": LEARNED_ROUTER_KEYS | {"num_experts_per_tok", "base_centroid_gain", "scoring_func"},
               "base": LEARNED_ROUTER_KEYS | {"num_experts_per_tok", "router_init_scale", "scoring_func",
                                              "norm_topk_prob"},
               "switch": {"num_experts_per_tok", "base_centroid_gain", "norm_topk_prob"},
               "topk": {"router_jitter", "base_centroid_gain"}}
COLUMNS = ["run", "router", "hash function", "experts", "params total", "params trainable", "params active",
           "updates/s", "tokens/s", "final valid ppl", "best valid ppl", "dropped frac mean / final",
           "load CV final (chosen / kept)", "wall time",
           "status"]


@dataclass
class RunSummary:
    path: Path
    status: str  # finished | stopped early | unfinished | missing
    config: dict = field(default_factory=dict)  # flattened dotted keys, model defaults filled in
    params: dict = field(default_factory=dict)  # total / trainable / frozen / active ... (step-0 row)
    flops_per_token: float | None = None
    tokens_per_step: float | None = None
    updates_per_sec: float | None = None  # logged steps / optimizer seconds over the whole run
    tokens_per_sec: float | None = None
    elapsed_seconds: float | None = None  # wall clock of every command that trained it (time/elapsed_s)
    dropped_frac: float | None = None  # mean over the logged windows
    final_dropped_frac: float | None = None  # the last window's
    load_cv: float | None = None  # the last window's, after capacity (what the experts processed)
    chosen_load_cv: float | None = None  # the last window's, before capacity (what the router chose)
    steps: int = 0  # last trained step
    train_time: list = field(default_factory=list)  # (step, cumulative optimizer seconds) per training row
    valid: list = field(default_factory=list)  # (step, valid ppl) per eval row
    exact_match: list = field(default_factory=list)  # (step, valid exact-match error) per eval row (tasks)
    far_error: list = field(default_factory=list)  # (step, error on answers shown >= data.task_far tokens back)
    expert_load: list = field(default_factory=list)  # final token count per expert, one list per MoE layer
    notes: list = field(default_factory=list)
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "missing"

    @property
    def wall_seconds(self) -> float | None:
        """The run's wall clock: set-up, evaluation and checkpoints included."""
        return self.elapsed_seconds

    def model(self, key: str, default=None):
        return self.config.get(f"model.{key}", default)

    @property
    def is_moe(self) -> bool:
        return bool(self.model("moe_layers"))


def model_defaults() -> dict:
    """HashMoEConfig's field defaults, read from the source rather than imported: importing it pulls in
    transformers (seconds), which a report does not need. Fields whose default is not a literal are skipped."""
    source = Path(__file__).resolve().parents[2] / "models" / "configuration_hashmoe.py"
    defaults = {}
    for node in ast.parse(source.read_text()).body if source.is_file() else []:
        if isinstance(node, ast.ClassDef) and node.name == "HashMoEConfig":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value:
                    with contextlib.suppress(ValueError):
                        defaults[item.target.id] = ast.literal_eval(item.value)
    return defaults


def recorded_model_config(run_dir: Path) -> dict:
    """The resolved model config saved with the run's latest checkpoint ({} when there is none)."""
    latest = ckpt.latest_checkpoint(run_dir)
    return ckpt.read_state(latest).get("model_config", {}) if latest is not None else {}


def router_names(router) -> list[str]:
    """The distinct routers a `router` value names, in order of first use ("hash", or a per-layer list)."""
    names = router if isinstance(router, list) else [router]
    return list(dict.fromkeys(names))


def router_label(router) -> str:
    """A short name for a `router` value: "hash", or a per-layer list run-length coded, "hash x3 + topk x5"."""
    if not isinstance(router, list):
        return str(router)
    runs: list[list] = []
    for name in router:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return " + ".join(name if count == 1 else f"{name} x{count}" for name, count in runs)


def read_config(path: Path, defaults: dict) -> dict:
    raw = yaml.safe_load((path / "config.yaml").read_text()) or {}
    model = {**defaults, **(raw.get("model") or {})}
    model["moe_layers"] = sorted(model.get("moe_layers") or [])  # None (the default) means dense, as []
    if not model["moe_layers"]:
        model = {k: v for k, v in model.items() if k not in MOE_ONLY_KEYS | HASH_ONLY_KEYS}
    else:
        routers = router_names(model.get("router"))
        unread = set.intersection(*(UNREAD_KEYS.get(r, set()) for r in routers))  # unread by every layer's router
        unread |= set() if "hash" in routers else HASH_ONLY_KEYS
        model = {k: v for k, v in model.items() if k not in unread}
    return {k: v for k, v in flatten_config({**raw, "model": model}).items() if k not in IGNORED_KEYS}


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def collect_run(path, defaults: dict | None = None) -> RunSummary:
    path = Path(path)
    run = RunSummary(path=path, status="missing", label=path.name)
    if not path.is_dir():
        run.notes.append("folder not found")
        return run
    rows = read_metrics(path)
    if not rows:
        run.notes.append("no metrics.jsonl (or it is empty): nothing to compare")
        return run
    if (path / "config.yaml").is_file():
        run.config = read_config(path, model_defaults() if defaults is None else defaults)
        # The model config a checkpoint recorded is what the run used, whatever today's defaults are (the default
        # eval_capacity_factor changed from 2.0 to null on 2026-12-01).
        recorded = recorded_model_config(path)
        run.config.update({f"model.{k}": recorded[k] for k in ("eval_capacity_factor",) if k in recorded})
    else:
        run.notes.append("no config.yaml: router, experts and label unknown")
    summary_file = path / "summary.json"
    if summary_file.is_file():
        run.status = "stopped early" if json.loads(summary_file.read_text()).get("stopped_early") else "finished"
    else:
        run.status = "unfinished"
        run.notes.append("unfinished: no summary.json (still running, or killed); numbers cover the logged steps")
    first = next((r for r in rows if "params/total" in r), {})
    run.params = {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith("params/")}
    run.flops_per_token = first.get("train/flops_per_token")
    train = [r for r in rows if "train/updates_per_sec" in r]
    run.dropped_frac = _mean(r.get("moe/dropped_frac") for r in train)
    last = train[-1] if train else {}
    run.final_dropped_frac = last.get("moe/dropped_frac")
    run.load_cv, run.chosen_load_cv = last.get("moe/load_cv"), last.get("moe/load_cv_chosen")
    run.steps = max((r["step"] for r in train), default=0)
    # Every row has tokens/s = updates/s x tokens per step.
    rated = [r for r in train if (r["train/updates_per_sec"] or 0) > 0 and r.get("train/tokens_per_sec")]
    if rated:
        run.tokens_per_step = rated[-1]["train/tokens_per_sec"] / rated[-1]["train/updates_per_sec"]
    # Each row covers the steps since the previous row at its measured rate; their sum is optimizer time, and
    # the run's rate is steps over that time (not a mean of the windows' rates, which overweights fast windows).
    seconds, previous, timed_steps = 0.0, 0, 0
    for r in train:
        if (r["train/updates_per_sec"] or 0) > 0:
            seconds += (r["step"] - previous) / r["train/updates_per_sec"]
            timed_steps += r["step"] - previous
        previous = r["step"]
        run.train_time.append((r["step"], seconds))
    if seconds > 0:
        run.updates_per_sec = timed_steps / seconds
        run.tokens_per_sec = run.updates_per_sec * run.tokens_per_step if run.tokens_per_step else None
    run.elapsed_seconds = next((r["time/elapsed_s"] for r in reversed(train) if "time/elapsed_s" in r), None)
    if train and run.elapsed_seconds is None:
        run.notes.append("no time/elapsed_s in its metrics (trained by an older hashmoe): wall time unknown")
    run.valid = [(r["step"], r["valid/ppl"]) for r in rows if "valid/ppl" in r]
    run.exact_match = [(r["step"], r["valid/exact_match_error"]) for r in rows if "valid/exact_match_error" in r]
    run.far_error = [(r["step"], r["valid/far_error"]) for r in rows if "valid/far_error" in r]
    if not run.valid:
        run.notes.append("no evaluation rows: valid ppl unknown")
    if run.is_moe:
        run.expert_load = read_expert_load(path)
    return run


def read_expert_load(path: Path) -> list:
    """The last `moe/expert_load/layer_i` histogram of each layer (bucket e = tokens routed to expert e)."""
    if not (path / "tb").is_dir():
        return []
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(path / "tb"), size_guidance={ea.HISTOGRAMS: 0, ea.SCALARS: 1, ea.TENSORS: 1})
    acc.Reload()
    tags = [t for t in acc.Tags().get("histograms", []) if t.startswith("moe/expert_load/layer_")]
    tags.sort(key=lambda t: int(t.rsplit("_", 1)[1]))
    return [list(max(acc.Histograms(t), key=lambda e: e.step).histogram_value.bucket) for t in tags]


def differing_keys(runs: list[RunSummary]) -> list[str]:
    """Keys with two or more values among the runs where they apply (a key pruned from a dense run does not
    count: the key that made it irrelevant, moe_layers or router, differs itself)."""
    configs = [r.config for r in runs if r.ok and r.config]
    prunable = {f"model.{k}" for k in MOE_ONLY_KEYS | HASH_ONLY_KEYS | set().union(*UNREAD_KEYS.values())}
    differing = []
    for key in sorted({k for c in configs for k in c}):
        values = [c[key] for c in configs if key in c]
        # A key some runs lack and no pruning explains is a difference too: a ladder's recurrence.kind against
        # a run without recurrence (flattened, that run has model.recurrence = None instead).
        if any(v != values[0] for v in values[1:]) or (len(values) < len(configs) and key not in prunable):
            differing.append(key)
    return differing


def fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and value and all(isinstance(v, dict) and "weight" in v for v in value):
        weights = [v["weight"] if v["weight"] is not None else 1.0 for v in value]  # a data mixture: its shares
        return "+".join(f"{v.get('name') or f'source{i}'}:{w / sum(weights):.3g}"
                        for i, (v, w) in enumerate(zip(value, weights)))
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def assign_labels(runs: list[RunSummary], keys: list[str]) -> None:
    # Short names (last component) unless two differing keys share one (optim.lr vs some.lr).
    shorts = [k.rsplit(".", 1)[-1] for k in keys]
    names = [s if shorts.count(s) == 1 else k for k, s in zip(keys, shorts)]
    for run in runs:
        if run.ok and run.config and keys:
            run.label = ", ".join(f"{n}={fmt_value(run.config[k])}" for k, n in zip(keys, names) if k in run.config)
    disambiguate(runs)


def disambiguate(runs: list[RunSummary]) -> None:
    """Equal labels (identical configs, or one run.name in two folders): the folder tells them apart."""
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1 and run.label != run.path.name:
            run.label = f"{run.label} ({run.path.name})"
    labels = [r.label for r in runs]
    for run in runs:  # two folders of one name (a/run, b/run): the whole path
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.path})"


def human(n) -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fmt_seconds(s) -> str:
    if s is None:
        return "-"
    s = round(s)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s // 60 % 60:02d}m"


def table_row(run: RunSummary) -> list[str]:
    moe = run.ok and run.config and run.is_moe
    routers = router_names(run.model("router", "-")) if moe else []
    router = router_label(run.model("router", "-")) if moe else "-"
    hash_fn = run.model("hash_function", "-") if "hash" in routers else "-"
    if "hash" in routers and (run.model("hash_heads") or 1) > 1:
        hash_fn += f" ({run.model('hash_heads')} heads)"
    if "hash" in routers and (run.model("hash_experts_per_tok") or 1) > 1:
        hash_fn += f" ({run.model('hash_experts_per_tok')} experts per token)"
    if "hash" in routers and run.model("hash_gate", "none") != "none":
        hash_fn += f", gate {run.model('hash_gate')} (DeepSeek-V4)"
    if hash_fn.startswith("oracle_future"):
        hash_fn += " (upper bound: routes by the next token, which a real model cannot see)"
    if {"switch", "topk"} & set(routers) and (run.model("router_bias_update_rate") or 0) > 0:
        router += f" + bias balancing ({run.model('router_bias_update_rate')})"
    experts = str(run.model("num_experts")) if moe else "dense" if run.config else "-"
    ppls = [p for _, p in run.valid]
    return [run.label, router, hash_fn, experts, human(run.params.get("total")),
            human(run.params.get("trainable")), human(run.params.get("active")), fmt(run.updates_per_sec, ".2f"),
            fmt(run.tokens_per_sec, ",.0f"), fmt(ppls[-1] if ppls else None, ".2f"),
            fmt(min(ppls) if ppls else None, ".2f"),
            f"{fmt(run.dropped_frac, '.4f')} / {fmt(run.final_dropped_frac, '.4f')}" if moe else "-",
            f"{fmt(run.chosen_load_cv, '.3f')} / {fmt(run.load_cv, '.3f')}" if moe else "-",
            fmt_seconds(run.wall_seconds), run.status]


def extra_columns(runs: list[RunSummary]) -> list[tuple[str, object]]:
    """Columns shown only when some run has them: frozen params (doping), passes through the stack
    (ladder / staircase), exact-match error (synthetic tasks)."""
    columns = []
    if any(r.params.get("frozen") for r in runs):
        columns.append(("params frozen", lambda r: human(r.params.get("frozen"))))
    if any(passes_per_token(r) > 1 for r in runs if r.config):
        columns.append(("passes per token", lambda r: str(passes_per_token(r)) if r.config else "-"))
    def learned(r):
        return r.config and r.is_moe and {"switch", "topk"} & set(router_names(r.model("router")))
    if any(learned(r) for r in runs):
        # Capacity at evaluation makes a token's output depend on the rest of the batch: say which was used.
        columns.append(("eval capacity", lambda r: (
            "-" if not learned(r)
            else "none" if r.model("eval_capacity_factor") is None else str(r.model("eval_capacity_factor")))))
    if any(r.exact_match for r in runs):
        columns.append(("final exact-match error", lambda r: fmt(final_of(r, "exact_match"), ".3f")))
        columns.append(("best exact-match error", lambda r: fmt(min((e for _, e in r.exact_match), default=None),
                                                                ".3f")))
    if any(r.far_error for r in runs):
        columns.append(("final far error (answers shown >= data.task_far tokens back)",
                        lambda r: fmt(final_of(r, "far_error"), ".3f")))
    return columns


def passes_per_token(run: RunSummary) -> int:
    kind = run.model("recurrence.kind")  # the config is flattened: recurrence.kind, recurrence.steps, ...
    if kind == "ladder":
        return run.model("recurrence.steps")
    if kind == "staircase":
        return run.model("recurrence.window") // run.model("recurrence.chunk")
    return 1


def render_report(runs: list[RunSummary], keys: list[str], groups: list | None = None) -> str:
    extra = extra_columns(runs)
    columns = COLUMNS[:-1] + [name for name, _ in extra] + COLUMNS[-1:]
    lines = ["# hashmoe compare", "",
             "Differing config keys: " + (", ".join(f"`{k}`" for k in keys) if keys
                                          else "none (runs labelled by folder name)"), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in runs:
        cells = table_row(r)
        cells = cells[:-1] + [cell(r) if r.ok else "-" for _, cell in extra] + cells[-1:]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += seed_table(groups or [])
    lines += ordering_table(groups or [])
    lines += ["", "Run folders:"] + [f"- {r.label}: `{r.path}`" for r in runs]
    notes = [f"- {r.label}: {n}" for r in runs for n in r.notes]
    lines += ["", "## Notes"] + (notes or ["- none"])
    lines += ["", "## How the numbers are computed",
              "- updates/s, tokens/s: logged steps / optimizer seconds over the whole run (the trainer's timer "
              "excludes evaluation and checkpointing; the first window, with its warm-up, is included).",
              "- wall time: the run's wall clock (`time/elapsed_s`: set-up, evaluation and checkpoints included, "
              "summed over the commands that trained it, each up to its last checkpoint).",
              "- dropped frac: mean over all logged windows / the last window. load CV: coefficient of variation of "
              "the tokens per expert in the last window, as the router chose them (before capacity) / as the "
              "experts processed them (after dropping). ppl: validation perplexity at the last evaluation "
              "(final) and the lowest one (best).",
              "- time axis: sum over windows of steps / measured updates/s. FLOPs axis: step x "
              "train/flops_per_token x tokens per step (active parameters only).", "", "## Plots"]
    lines += [f"![{title}]({name})" for name, title in PLOTS.items()]
    if groups:
        lines.append(f"![{SEED_PLOT[1]}]({SEED_PLOT[0]})")
    return "\n".join(lines) + "\n"


def write_plots(runs: list[RunSummary], out_dir: Path, groups: list | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters
    import matplotlib.pyplot as plt
    import numpy as np

    evaluated = [r for r in runs if r.valid]

    def save(fig, name: str):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)

    def ppl_plot(name: str, xlabel: str, x_of):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in evaluated:
            points = [(x_of(run, s), p) for s, p in run.valid]
            points = [(x, p) for x, p in points if x is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=run.label)
        ax.set(xlabel=xlabel, ylabel="valid ppl", yscale="log", title=PLOTS[name])
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run with evaluation rows", ha="center", transform=ax.transAxes)
        save(fig, name)

    def seconds_at(run, step):  # training time at an eval step, interpolated between logged windows
        if not run.train_time:
            return None
        steps, seconds = zip(*([(0, 0.0)] + run.train_time))
        return float(np.interp(step, steps, seconds))

    # FLOPs from the model's per-token cost and the batch: exact, where flops_per_sec x time would add the
    # timing noise of each window to the x axis.
    def flops_at(run, step):
        return step * run.flops_per_token * run.tokens_per_step if run.flops_per_token and run.tokens_per_step \
            else None

    ppl_plot("valid_ppl_vs_step.png", "step", lambda run, step: step)
    ppl_plot("valid_ppl_vs_time.png", "training wall-clock (s, optimizer steps only)", seconds_at)
    ppl_plot("valid_ppl_vs_flops.png", "training FLOPs (active parameters)", flops_at)

    timed = [r for r in runs if r.updates_per_sec]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(timed) + 2), 4.5))
    ax.bar(range(len(timed)), [r.updates_per_sec for r in timed], color="tab:blue")
    ax.set_xticks(range(len(timed)), [r.label for r in timed], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="updates/s (steps / optimizer seconds)", title=PLOTS["updates_per_sec.png"])
    save(fig, "updates_per_sec.png")

    final_vs_params(evaluated, out_dir, plt, save)
    if groups:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        seed_bands(groups, ax)
        ax.set(xlabel="step", ylabel="valid ppl", yscale="log", title=SEED_PLOT[1])
        if ax.lines:
            ax.legend(fontsize=8)
        save(fig, SEED_PLOT[0])

    loaded = [r for r in runs if r.expert_load]
    cols = max((len(r.expert_load) for r in loaded), default=1)
    fig, axes = plt.subplots(max(1, len(loaded)), cols, figsize=(3.6 * cols + 1, 2.8 * max(1, len(loaded))),
                             squeeze=False)
    for row, run in enumerate(loaded):
        for col, counts in enumerate(run.expert_load):
            total = sum(counts) or 1.0
            ax = axes[row][col]
            ax.bar(range(len(counts)), [c / total for c in counts], color="tab:green")
            ax.axhline(1 / len(counts), color="black", linestyle="--", linewidth=1, label="1/E (balanced)")
            layers = run.model("moe_layers") or []  # histogram layer_i is the i-th MoE block
            ax.set_title(f"{run.label}\nblock {layers[col] if col < len(layers) else col}", fontsize=8)
            ax.set(xlabel="expert", ylabel="share of tokens", xticks=range(0, len(counts), max(1, len(counts) // 8)))
            ax.legend(fontsize=7)
    for ax in [a for line in axes for a in line if not a.has_data()]:
        ax.axis("off")
    if not loaded:
        axes[0][0].text(0.5, 0.5, "no MoE run with expert-load histograms", ha="center", va="center")
    save(fig, "expert_load.png")


def final_vs_params(runs: list[RunSummary], out_dir: Path, plt, save) -> None:
    """Final validation result (exact-match error for tasks, else ppl) against trainable params, total params
    and training FLOPs per token: frozen ("doping") and structured runs separate the first two, ladder and
    staircase runs the last (Chatelain et al. 2021 plot loss against each in turn)."""
    task = any(r.exact_match for r in runs)
    axes_of = [("trainable parameters", lambda r: r.params.get("trainable")),
               ("total parameters (trainable + frozen)", lambda r: r.params.get("total")),
               ("training FLOPs per token (active)", lambda r: r.flops_per_token)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (xlabel, x_of) in zip(axes, axes_of):
        for run in runs:
            y = final_of(run, "exact_match") if task else run.valid[-1][1]
            if x_of(run) and y is not None:
                ax.scatter([x_of(run)], [y], s=40)
                ax.annotate(run.label, (x_of(run), y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=xlabel, xscale="log")
    axes[0].set(ylabel="final valid exact-match error" if task else "final valid ppl")
    fig.suptitle(PLOTS["final_vs_params.png"], fontsize=10)
    save(fig, "final_vs_params.png")


def run_name(path: Path) -> str:
    """run.name from the run's config.yaml, else the folder name."""
    try:
        return str(yaml.safe_load((path / "config.yaml").read_text())["run"]["name"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return path.name


def compare_runs(paths, out_dir, label_by: str = "config") -> Path:
    """Collect every run, write report.md and the PNGs into out_dir; returns the report's path."""
    defaults = model_defaults()
    runs = [collect_run(p, defaults) for p in paths]
    if not any(r.ok for r in runs):
        listed = ", ".join(f"{r.path} ({r.notes[0]})" for r in runs)
        raise UserError("RUN_DIR", f"no run to compare: {listed}",
                        "Pass run folders written by `hashmoe train` (each holds metrics.jsonl).")
    keys = differing_keys(runs)
    assign_labels(runs, keys)
    if label_by == "name":
        for run in runs:
            run.label = run_name(run.path)
        disambiguate(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_by_seed(runs, keys)
    write_plots(runs, out_dir, groups)
    report = out_dir / "report.md"
    report.write_text(render_report(runs, keys, groups))
    return report
