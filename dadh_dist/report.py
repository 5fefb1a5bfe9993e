"""Evaluation of a trained run under the asymmetric protocol, with figures and a report
(docs/design.md §6).

Database codes are the learned rows of B; queries are encoded by the network (sign of f, g or
f + g). The ranking is by Hamming distance with ties in database order, so mAP@all here is the
number the training run reports in `final_metrics.json`. `write` puts next to each other:

    metrics.json          every metric per query encoder, the curves, and the run's own numbers
    pr_curve.png          precision–recall over Hamming radii 0..k
    precision_at_n.png    precision of the first N retrieved
    examples.png          example queries and their top-10 database images (wrong ones in red)
    report.md             a short Markdown summary that links the figures
    tb/                   the same scalars, figures and report for TensorBoard (tags
                          eval_<split>/<metric>, eval_<split>/pr_curve, .../precision_at_n,
                          .../examples, .../report)

A hash function whose codes collapsed (fewer distinct query codes than classes, or mAP within
`health.CHANCE_MARGIN` of the chance level) is not a finished result: `evaluate` records a
warning per query encoder, and the report, metrics.json and the console show it.

Figures are drawn with matplotlib's object API on the Agg canvas: no display and no pyplot state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dadh_dist import codesfile, encoding, health, retrieval
from dadh_dist.data import Dataset
from dadh_dist.inference import HashFunction

P_AT_N_GRID = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
               200000, 500000, 1000000)
RADIUS = 2
DEFAULT_TOPK = 1000
"""mAP@k cut-off when neither --topk nor the run's eval.topk names one."""
TOP = 10
NAMES = {"f": "sign(f)", "g": "sign(g)", "fg": "sign(f+g)"}


@dataclass
class Evaluation:
    split: str
    encoders: list[str]
    metrics: dict[str, float]
    """Flat, named like final_metrics.json: map_all_f, map_at_100_f, p_at_1000_f, ..."""
    topk: int
    precision_at: int
    query_codes: dict[str, np.ndarray] = field(default_factory=dict)
    pr: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """encoder -> (precision, recall), each (k + 1,): Hamming radius 0..k."""
    p_at_n: dict[str, dict[int, float]] = field(default_factory=dict)
    by_labels: dict[str, list[dict]] = field(default_factory=dict)
    """Multi-label data only: encoder -> one row per number of labels a query carries
    ({"labels", "queries", "map", "p_at_n"}; map is mAP@topk, mAP@all when topk is 0)."""
    warnings: dict[str, str] = field(default_factory=dict)
    """encoder -> one line from `health.collapse_warning`, for the encoders whose codes
    collapsed."""
    health: dict = field(default_factory=dict)
    """What the warnings are judged on: chance-level mAP and distinct code counts."""

    def table(self) -> list[tuple[str, str]]:
        """(column title, metric key without the encoder suffix), in report order."""
        cols = [("mAP@all", "map_all")]
        if self.topk:
            cols.append((f"mAP@{self.topk}", f"map_at_{self.topk}"))
        cols += [(f"P@{self.precision_at}", f"p_at_{self.precision_at}"),
                 (f"P@H≤{RADIUS}", f"p_hamming{RADIUS}"), ("tie-aware mAP", "map_tie_aware")]
        return cols

    def best(self) -> str:
        return max(self.encoders, key=lambda e: self.metrics[f"map_all_{e}"])


def evaluate(hf: HashFunction, dataset: Dataset, encoders: list[str] | None = None,
             split: str = "query", topk: int | None = None,
             precision_at: int | None = None, batch_size: int | None = None) -> Evaluation:
    """Every metric of one query split against the learned database codes B, per encoder, and a
    collapse warning for each encoder whose codes collapsed."""
    encoders = list(encoders or [e for e in hf.cfg.eval.encoders if e in hf.encoders])
    for e in encoders:
        hf.check_encoder(e, "--encoders")
    precision_at = precision_at or hf.cfg.eval.precision_at
    queries, db = getattr(dataset, split), dataset.database
    if len(db) != len(hf.B):
        raise codesfile.CodesError(
            f"{hf.checkpoint}: B has {len(hf.B)} rows, but the run's database split has "
            f"{len(db)} images (did the data change since training?)")
    if topk is None:  # eval.topk = 0 means mAP@all for the run; a report still shows mAP@k
        topk = hf.cfg.eval.topk or min(DEFAULT_TOPK, len(db))
    outputs = hf.outputs(queries.images, encoders, batch_size)
    ev = Evaluation(split, encoders, {}, topk, precision_at)
    relevant = health.relevant_counts(queries.labels, db.labels)
    ev.health = {"chance_map": health.chance_of(relevant, len(db)),
                 "best_p_at_n": health.best_precision_at(relevant, min(precision_at, len(db))),
                 "distinct_database_codes": health.distinct_codes(hf.B),
                 "distinct_query_codes": {}}
    n = len(db)
    ns = sorted({N for N in P_AT_N_GRID if N < n} | {n})
    for e in encoders:
        q = encoding.query_codes(outputs, e)
        args = (q, hf.B, queries.labels, db.labels)
        per = retrieval.per_query_metrics(*args, topk=topk or None, precision_at=precision_at)
        ev.metrics[f"map_all_{e}"] = float(per["ap_all"].mean())
        if topk:
            ev.metrics[f"map_at_{topk}_{e}"] = float(per["ap_topk"].mean())
        ev.metrics[f"p_at_{precision_at}_{e}"] = float(per["p_at_n"].mean())
        ev.metrics[f"p_hamming{RADIUS}_{e}"] = retrieval.precision_within_radius(*args, RADIUS)
        ev.metrics[f"map_tie_aware_{e}"] = retrieval.mean_average_precision_tie_aware(*args)
        ev.pr[e] = retrieval.precision_recall_curve(*args)
        ev.p_at_n[e] = retrieval.precision_at_n(*args, ns)
        ev.query_codes[e] = q
        ev.health["distinct_query_codes"][e] = health.distinct_codes(q)
        warning = health.collapse_warning(q, hf.B, queries.labels, db.labels,
                                          ev.metrics[f"map_all_{e}"])
        if warning:
            ev.warnings[e] = warning
        if dataset.multi_label:
            ev.by_labels[e] = by_label_count(per["ap_topk"], per["p_at_n"], queries.labels)
    return ev


def by_label_count(ap: np.ndarray, p_at_n: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Per-query metrics averaged over the queries with 1, 2, ... labels: where a multi-label
    ranking loses (one label to match, or several)."""
    counts = np.asarray(labels).sum(1)
    return [{"labels": int(c), "queries": int((counts == c).sum()),
             "map": float(ap[counts == c].mean()), "p_at_n": float(p_at_n[counts == c].mean())}
            for c in np.unique(counts)]


def run_reported(hf: HashFunction, ev: Evaluation) -> dict[str, float]:
    """The run's own final test metrics that this evaluation recomputes (empty when the
    checkpoint is not the run's last or the split is not the test queries)."""
    path = hf.run_folder / "final_metrics.json"
    if ev.split != "query" or hf.t != hf.cfg.train.outer_iters or not path.is_file():
        return {}
    try:
        final = json.loads(path.read_text())
    except ValueError:
        return {}
    return {k: float(final[k]) for k in ev.metrics if isinstance(final.get(k), (int, float))}


# --------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def pr_figure(ev: Evaluation, bits: int):
    fig = _figure(4.5, 4.2)
    ax = fig.add_subplot()
    for e in ev.encoders:
        precision, recall = ev.pr[e]
        ax.plot(recall, precision, marker=".", label=NAMES[e])
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision–recall, Hamming radius 0..{bits}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def p_at_n_figure(ev: Evaluation):
    fig = _figure(4.5, 4.2)
    ax = fig.add_subplot()
    for e in ev.encoders:
        ns = sorted(ev.p_at_n[e])
        ax.plot(ns, [ev.p_at_n[e][N] for N in ns], marker=".", label=NAMES[e])
    ax.set_xscale("log")
    ax.set(xlabel="N (retrieved, ties in database order)", ylabel="precision@N", ylim=(0, 1.02),
           title="precision of the top N")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def _show(ax, image: np.ndarray) -> None:
    """(C, H, W) uint8 into an axis without ticks."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image.transpose(1, 2, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def _label_text(labels: np.ndarray) -> str:
    classes = np.flatnonzero(labels)
    return "class " + ",".join(str(c) for c in classes) if len(classes) else "no label"


def examples_figure(ev: Evaluation, hf: HashFunction, dataset: Dataset, count: int,
                    encoder: str):
    """`count` queries spread over the split, each with its top-10 database images; frames
    are green when the image shares a label with the query and red when it does not."""
    queries, db = getattr(dataset, ev.split), dataset.database
    rows = np.unique(np.linspace(0, len(queries) - 1, min(count, len(queries))).astype(int))
    q_packed = retrieval.pack_codes(ev.query_codes[encoder][rows])
    top, dist = codesfile.topk(q_packed, retrieval.pack_codes(hf.B), TOP, hf.bits)
    cols = 1 + top.shape[1]
    fig = _figure(1.1 * cols, 1.25 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, i in enumerate(rows):
        _show(axes[r, 0], queries.images[i])
        axes[r, 0].set_title(f"query\n{_label_text(queries.labels[i])}", fontsize=7)
        for c, (j, d) in enumerate(zip(top[r], dist[r]), start=1):
            ax = axes[r, c]
            _show(ax, db.images[j])
            right = bool((queries.labels[i] & db.labels[j]).any())
            color = "tab:green" if right else "tab:red"
            for spine in ax.spines.values():
                spine.set(color=color, linewidth=2.5 if right else 4)
            ax.set_title(f"d={d}" + ("" if right else " wrong"), fontsize=7, color=color)
    fig.suptitle(f"top-{TOP} by Hamming distance, queries {NAMES[encoder]}, database B "
                 f"(red = shares no label with the query)", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------- output


def markdown(ev: Evaluation, hf: HashFunction, dataset: Dataset, reported: dict[str, float],
             figures: dict[str, str]) -> str:
    queries = getattr(dataset, ev.split)
    cols = ev.table()
    lines = [
        f"# Evaluation: {hf.run_folder.name}, checkpoint t={hf.t}",
        "",
        f"- checkpoint: `{hf.checkpoint}`",
        f"- model SHA-256: `{hf.model_sha256}`",
        f"- data: {dataset.name}, {len(queries)} {ev.split} images against a database of "
        f"{len(dataset.database)} ({'multi' if dataset.multi_label else 'single'}-label)",
        f"- codes: {hf.bits} bits; database = the learned B, queries = the network; ranking by "
        "Hamming distance, ties in database order (tie-aware mAP averages over tie orders)",
        *_health_line(ev),
        "",
        "| query encoder | " + " | ".join(title for title, _ in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for e in ev.encoders:
        values = " | ".join(f"{ev.metrics[f'{key}_{e}']:.4f}" for _, key in cols)
        lines.append(f"| {NAMES[e]} | {values} |")
    lines += ["", f"Best query encoder by mAP@all: **{NAMES[ev.best()]}**.", ""]
    for e, warning in ev.warnings.items():
        lines += [f"> **Warning** ({NAMES[e]}): {warning}. These numbers describe a hash "
                  "function that did not learn; do not compare them with other runs.", ""]
    if ev.by_labels:
        k = f"mAP@{ev.topk}" if ev.topk else "mAP@all"
        lines += [f"By the number of labels a query carries ({k} / P@{ev.precision_at}):", "",
                  "| labels | queries | " + " | ".join(NAMES[e] for e in ev.encoders) + " |",
                  "|---" * (len(ev.encoders) + 2) + "|"]
        for rows in zip(*(ev.by_labels[e] for e in ev.encoders)):
            cells = " | ".join(f"{r['map']:.4f} / {r['p_at_n']:.4f}" for r in rows)
            lines.append(f"| {rows[0]['labels']} | {rows[0]['queries']} | {cells} |")
        lines.append("")
    if reported:
        gap = max(abs(ev.metrics[k] - v) for k, v in reported.items())
        verdict = "agrees with" if gap <= 1e-9 else "DIFFERS from"
        lines += [f"This {verdict} the run's own `final_metrics.json` "
                  f"({len(reported)} metrics, largest difference {gap:.2e}).", ""]
    lines += [f"![{title}]({name})" for title, name in figures.items()]
    return "\n".join(lines) + "\n"


def _health_line(ev: Evaluation) -> list[str]:
    if not ev.health:
        return []
    counts = ", ".join(f"{NAMES[e]} {c}" for e, c in ev.health["distinct_query_codes"].items())
    lines = [f"- health: {ev.health['distinct_database_codes']} distinct database codes; "
             f"distinct query codes {counts}; a random ranking's mAP is "
             f"{ev.health['chance_map']:.4f}"]
    best = ev.health.get("best_p_at_n")
    if best is not None and best < 0.9995:
        lines.append(f"- P@{ev.precision_at} is at most {best:.4f} here, for any ranking: some "
                     f"queries have fewer than {ev.precision_at} relevant database images")
    return lines


def write(out: str | Path, ev: Evaluation, hf: HashFunction, dataset: Dataset,
          examples: int = 6, tensorboard: bool = True) -> dict[str, Path]:
    """Write metrics.json, the three PNGs, report.md and TensorBoard events into `out`. They
    are made in a staging folder inside `out` and moved in once all are made, so an evaluation
    stopped on the way (an error, a full disk, Ctrl-C) leaves the earlier one's files whole and
    no file half-written. What an earlier evaluation wrote there and this one does not
    (examples.png, tb/) goes: an events file per evaluation would give TensorBoard two values
    per step."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".evaluate-", dir=out))
    try:
        made = _write_files(staging, ev, hf, dataset, examples, tensorboard)
        for name in made:
            if (staging / name).is_dir() and (out / name).exists():
                os.replace(out / name, staging / f"{name}.earlier")  # a folder: moved aside
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not tensorboard:
        shutil.rmtree(out / "tb", ignore_errors=True)
    if examples == 0:
        (out / "examples.png").unlink(missing_ok=True)
    return {key: out / name for key, name in made.items()}


def _write_files(folder: Path, ev: Evaluation, hf: HashFunction, dataset: Dataset,
                 examples: int, tensorboard: bool) -> dict[str, str]:
    """`write`'s files, made in `folder`: {key of write's result: name in folder}."""
    reported = run_reported(hf, ev)
    figs = {"precision–recall": ("pr_curve.png", pr_figure(ev, hf.bits)),
            "precision@N": ("precision_at_n.png", p_at_n_figure(ev))}
    if examples > 0:
        figs["example retrievals"] = ("examples.png",
                                      examples_figure(ev, hf, dataset, examples, ev.best()))
    made = {}
    for name, fig in figs.values():
        fig.savefig(folder / name, dpi=120)
        made[name] = name
    md = markdown(ev, hf, dataset, reported, {t: name for t, (name, _) in figs.items()})
    (folder / "report.md").write_text(md)
    made["report.md"] = "report.md"
    payload = {
        "checkpoint": str(hf.checkpoint), "t": hf.t, "model_sha256": hf.model_sha256,
        "dataset": dataset.name, "split": ev.split, "queries": len(getattr(dataset, ev.split)),
        "database": len(dataset.database), "bits": hf.bits, "encoders": ev.encoders,
        "ranking": "Hamming distance, ties in database order", "metrics": ev.metrics,
        "curves": {e: {"precision": ev.pr[e][0].tolist(), "recall": ev.pr[e][1].tolist(),
                       "p_at_n": {str(N): v for N, v in ev.p_at_n[e].items()}}
                   for e in ev.encoders},
        "run_reported": reported,
        "warnings": ev.warnings, "health": ev.health,
    }
    if ev.by_labels:
        payload["by_label_count"] = ev.by_labels
    (folder / "metrics.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
    made["metrics.json"] = "metrics.json"
    if tensorboard:
        # tags: the file names without .png, nothing to quote in a TensorBoard filter
        _tensorboard(folder / "tb", ev, hf.t,
                     {name.removesuffix(".png"): f for name, f in figs.values()}, md)
        made["tb"] = "tb"
    return made


def _tensorboard(folder: Path, ev: Evaluation, step: int, figures: dict, md: str) -> Path:
    """Scalars eval_<split>/<metric>, figures eval_<split>/<tag> (tag: pr_curve, precision_at_n,
    examples) and the report as text."""
    import matplotlib

    matplotlib.use("Agg")  # tensorboard renders through pyplot's module; never open a window
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        for key, value in ev.metrics.items():
            if math.isfinite(value):
                writer.add_scalar(f"eval_{ev.split}/{key}", value, step)
        for tag, fig in figures.items():
            writer.add_figure(f"eval_{ev.split}/{tag}", fig, step, close=False)
        writer.add_text(f"eval_{ev.split}/report", md, step)
    finally:
        writer.close()
    return folder
