"""Seeds as an axis of `hashmoe compare`: runs whose configs differ only by `run.seed` form one group, reported
as mean ± std (n) with a band in the plot. One seed is an anecdote; the group says how far the seeds spread.

Works on compare's RunSummary objects (config: flattened dotted keys; valid: [(step, ppl)]).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

SEED_KEY = "run.seed"


@dataclass
class SeedGroup:
    label: str
    runs: list = field(default_factory=list)

    @property
    def seeds(self) -> list:
        return [r.config.get(SEED_KEY) for r in self.runs]


def group_by_seed(runs: list, keys: list[str]) -> list[SeedGroup]:
    """Groups of runs equal in every config key but the seed, with two seeds or more (copies of one run are not
    seeds), in the order of their first run; `keys` are the differing keys (the label: those but the seed)."""
    groups: dict[tuple, SeedGroup] = {}
    for run in runs:
        if not (run.ok and run.config):
            continue
        identity = tuple(sorted((k, repr(v)) for k, v in run.config.items() if k != SEED_KEY))
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={run.config[k]}" for k in keys
                          if k != SEED_KEY and k in run.config) or "all runs"
        groups.setdefault(identity, SeedGroup(label)).runs.append(run)
    return [g for g in groups.values() if len(set(map(repr, g.seeds))) >= 2]


def mean_std(values: list, spec: str = ".2f") -> str:
    """'mean ± std (n)' of the numbers among values; '-' if none."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    if not numbers:
        return "-"
    spread = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return f"{statistics.mean(numbers):{spec}} ± {spread:{spec}} ({len(numbers)})"


def seed_table(groups: list[SeedGroup]) -> list[str]:
    """The report's "Across seeds" section (markdown lines); empty without groups."""
    if not groups:
        return []
    # tasks: the final answer errors too (far: answers whose position was shown >= data.task_far tokens back)
    extra = [(name, attr) for name, attr in (("final exact-match error", "exact_match"),
                                             ("final far error", "far_error"))
             if any(getattr(r, attr, None) for g in groups for r in g.runs)]
    lines = ["", "## Across seeds", "",
             "Runs equal in every config key but `run.seed`: mean ± sample std (number of runs).", "",
             "| group | seeds | final valid ppl | best valid ppl | updates/s | final dropped frac |" +
             "".join(f" {name} |" for name, _ in extra),
             "|---|---|---|---|---|---|" + "---|" * len(extra)]
    for group in groups:
        final = [final_of(r, "valid") for r in group.runs]
        best = [min(p for _, p in r.valid) if r.valid else None for r in group.runs]
        lines.append(f"| {group.label} | {', '.join(str(s) for s in group.seeds)} | {mean_std(final)} | "
                     f"{mean_std(best)} | {mean_std([r.updates_per_sec for r in group.runs])} | "
                     f"{mean_std([r.final_dropped_frac for r in group.runs], '.3f')} |" +
                     "".join(f" {mean_std([final_of(r, attr) for r in group.runs], '.3f')} |" for _, attr in extra))
    return lines


def final_of(run, attr: str):
    """The last value of a run's (step, value) series `attr`, None if it has none."""
    series = getattr(run, attr)
    return series[-1][1] if series else None


def ordering_by_step(groups: list[SeedGroup]) -> list[tuple[int, list[str]]]:
    """(step, group labels from the lowest mean valid ppl to the highest) at every step all the groups' runs
    evaluated: how the ranking moved during training."""
    by_step = [dict(r.valid) for g in groups for r in g.runs]
    steps = sorted(set.intersection(*(set(s) for s in by_step))) if by_step else []
    rows = []
    for step in steps:
        means = {g.label: statistics.mean(dict(r.valid)[step] for r in g.runs) for g in groups}
        rows.append((step, sorted(means, key=means.get)))
    return rows


def ordering_table(groups: list[SeedGroup]) -> list[str]:
    """The report's "Ordering over training" section: the groups' rank (1 = lowest mean valid ppl) at each shared
    evaluation step, and the last step at which the ranking changed."""
    rows = ordering_by_step(groups)
    if len(groups) < 2 or len(rows) < 2:
        return []
    last_change = next((step for (step, order), (_, before) in zip(reversed(rows), reversed(rows[:-1]))
                        if order != before), None)
    lines = ["", "## Ordering over training", "",
             "Rank of each group by mean valid ppl (1 = best) at the evaluation steps all its runs share. " +
             (f"The ranking last changed at step {last_change} (of {rows[-1][0]})." if last_change is not None
              else "The ranking never changed."), "",
             "| group | " + " | ".join(str(step) for step, _ in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for group in groups:
        lines.append(f"| {group.label} | " + " | ".join(str(order.index(group.label) + 1) for _, order in rows) + " |")
    return lines


def seed_bands(groups: list[SeedGroup], ax) -> None:
    """Mean valid ppl per step with a band from the lowest to the highest seed, at the steps all runs share."""
    for group in groups:
        by_step = [dict(r.valid) for r in group.runs]
        steps = sorted(set.intersection(*(set(s) for s in by_step))) if by_step else []
        if not steps:
            continue
        values = [[s[step] for s in by_step] for step in steps]
        line, = ax.plot(steps, [statistics.mean(v) for v in values], marker=".",
                        label=f"{group.label} (n={len(group.runs)})")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.2)
