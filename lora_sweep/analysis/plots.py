"""The trade-off figures, one set per task and model, plus a small-multiples overview across tasks.

Every function takes the tidy tables (analysis.tables) and writes PNG and SVG, returning the PNG path.
Where a learning-rate grid exists, the trade-off plots show each rank at the learning rate chosen on the tuning split;
error bars are 95 % intervals over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # keep text as text in SVG: searchable, and checked by the tests
matplotlib.rcParams["svg.hashsalt"] = "lora-sweep"  # SVG element ids from a fixed salt, not a random one
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lora_sweep.analysis.tables import oriented, tuned  # noqa: E402
from lora_sweep.metrics import metric_info  # noqa: E402

GIB = 2**30

SPLIT = ["weights", "gradients", "optimizer", "activations", "other"]
FULL_COLOR = "black"


def save(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for suffix in ("png", "svg"):  # no date, fixed element ids: the same analysis gives the same bytes
        fig.savefig(folder / f"{name}.{suffix}", dpi=130, metadata={"Date": None})
    plt.close(fig)
    return folder / f"{name}.png"


def view(metric: str) -> tuple[float, str]:
    """The display scale of a metric and its axis label (units, and which way is better)."""
    info = metric_info(metric)
    better = "higher" if info.higher_is_better else "lower"
    return info.scale, f"{metric} ({info.unit}; {better} is better)" if info.unit else f"{metric} ({better} is better)"


def series_label(row) -> str:
    return f"{row['targets']}, {row['scaling']}"


def best_lr(lora: pd.DataFrame) -> pd.DataFrame:
    """One row per (series, rank): the learning rate chosen on the tuning split."""
    return tuned(lora.assign(series=lora.apply(series_label, axis=1)), ["series", "r"])


def pareto(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both axes (lower x, higher y), sorted by x."""
    order = np.lexsort((-y, x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


def _full_band(ax, full: pd.Series, metric: str) -> None:
    scale, _ = view(metric)
    mean, ci = scale * full["primary_value_mean"], scale * np.nan_to_num(full["primary_value_ci95"])
    ax.axhline(mean, color=FULL_COLOR, lw=1.2, ls="--", label=f"full FT ({metric} {mean:.1f})")
    if ci > 0:
        ax.axhspan(mean - ci, mean + ci, color=FULL_COLOR, alpha=0.12, label="full FT 95% CI")


def _tradeoff(ax, points: pd.DataFrame, full: pd.Series | None, x: str, full_x: float | None, metric: str) -> None:
    scale, label = view(metric)
    for series, group in points.groupby("series", sort=True):
        y, err = scale * group["primary_value_mean"], scale * group["primary_value_ci95"].fillna(0)
        ax.errorbar(group[x], y, yerr=err, marker="o", capsize=3, label=series)
        for _, row in group.iterrows():
            ax.annotate(f"r={int(row['r'])}", (row[x], scale * row["primary_value_mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    xs, ys = points[x].to_numpy(float), (scale * points["primary_value_mean"]).to_numpy(float)
    if full is not None:
        _full_band(ax, full, metric)
        if full_x is not None:
            xs, ys = np.append(xs, full_x), np.append(ys, scale * full["primary_value_mean"])
            ax.plot([full_x], [scale * full["primary_value_mean"]], marker="*", ms=12, color=FULL_COLOR, ls="none")
    front = pareto(xs, oriented(ys, metric_info(metric).higher_is_better))
    ax.step(xs[front], ys[front], where="post", color="tab:red", alpha=0.35, lw=4, label="Pareto frontier")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def metric_vs_params(points, full, title, metric, folder, name) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full_x = full["params_trainable_mean"] if full is not None else None
    _tradeoff(ax, points, full, "params_trainable_mean", full_x, metric)
    if full_x is not None:
        ax.annotate(f"full FT: {full_x:,.0f}", (full_x, view(metric)[0] * full["primary_value_mean"]), textcoords="offset points",
                    xytext=(-10, 8), fontsize=7, ha="right")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_title(f"{title}: {metric} against trainable parameters")
    return save(fig, folder, name)


def metric_vs_memory(points, full, title, metric, device, folder, name) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _tradeoff(ax, points, full, "peak_mib_mean", full["peak_mib_mean"] if full is not None else None, metric)
    what = "peak GPU memory (tensor bytes, MiB)" if device == "cuda" else "peak tensor memory on CPU (MiB)"
    ax.set_xlabel(what)
    ax.set_title(f"{title}: {metric} against peak memory")
    return save(fig, folder, name)


def memory_split(points, full, title, folder, name) -> Path:
    series = points["series"].value_counts().index[0]
    rows = points[points["series"] == series].sort_values("r")
    labels = [f"r={int(r)}" for r in rows["r"]]
    bars = [rows.reindex(columns=[f"mem_{k}_mib_mean" for k in SPLIT]).fillna(0).to_numpy()]
    if full is not None:
        labels.append("full FT")
        bars.append(full.reindex([f"mem_{k}_mib_mean" for k in SPLIT]).fillna(0).to_numpy(float)[None, :])
    values = np.vstack(bars)
    grads = rows["grad_after_backward_mib_mean"].tolist() + ([full["grad_after_backward_mib_mean"]] if full is not None else [])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = np.zeros(len(labels))
    for i, part in enumerate(SPLIT):
        ax.bar(labels, values[:, i], bottom=bottom, label=part)
        bottom += values[:, i]
    # At the peak (inside backward) most gradients do not exist yet; full FT's gradient memory shows at backward's end.
    ax.scatter(labels, np.nan_to_num(np.asarray(grads, float)), marker="_", s=400, color="black", zorder=3,
               label="gradients at the end of backward")
    ax.set_ylabel("memory at the peak of a training step (MiB)")
    ax.set_title(f"{title}: peak memory split ({series})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, folder, name)


def metric_vs_rank(points, full, title, metric, folder, name) -> Path:
    scale, label = view(metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series, group in points.assign(series=points.apply(series_label, axis=1)).groupby("series", sort=True):
        best = tuned(group, ["r"])
        ax.errorbar(best["r"], scale * best["primary_value_mean"], yerr=scale * best["primary_value_ci95"].fillna(0),
                    marker="o", capsize=3, label=series)
    if full is not None:
        _full_band(ax, full, metric)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r (log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{title}: {metric} against rank, by targets and alpha policy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, folder, name)


def _mean_curve(curves: list[str]) -> tuple[np.ndarray, np.ndarray]:
    frames = [pd.Series(dict((int(s), float(v)) for s, v in json.loads(c))) for c in curves if c]
    mean = pd.concat(frames, axis=1).mean(axis=1).sort_index()
    return mean.index.to_numpy(), mean.to_numpy()


def loss_curves(runs: pd.DataFrame, title, folder, name) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lora = runs[runs["method"] != "full"]
    series = lora.assign(series=lora.apply(series_label, axis=1))
    main = series["series"].value_counts().index[0] if len(series) else None
    for r, group in series[series["series"] == main].groupby("r", sort=True):
        steps, loss = _mean_curve(group["loss_curve"].tolist())
        ax.plot(steps, loss, label=f"LoRA r={int(r)}")
    full = runs[runs["method"] == "full"]
    if len(full):
        steps, loss = _mean_curve(full["loss_curve"].tolist())
        ax.plot(steps, loss, color=FULL_COLOR, lw=2, label="full FT")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer step (log scale)")
    ax.set_ylabel("training loss (mean over logged window and seeds)")
    ax.set_title(f"{title}: training loss" + (f" ({main})" if main else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, folder, name)


def learning_curves(gaps: pd.DataFrame, margin: float, title: str, metric: str, folder: Path, name: str) -> Path:
    """Left: the tuning metric against optimizer steps per rank, full FT in black. Right: the paired LoRA − full FT
    difference on the tuning split with its 95 % interval at each checkpoint, and the margin (lora_sweep/analysis/curves.py)."""
    _, label = view(metric)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    ranks = sorted(gaps["r"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ranks)))
    offset = 0.006 * gaps["step"].max()
    for k, (r, color) in enumerate(zip(ranks, colors)):
        g = gaps[gaps["r"] == r].sort_values("step")
        left.plot(g["step"], g["lora"], marker="o", color=color, label=f"LoRA r={r}")
        shift = g["step"] + (k - len(ranks) / 2) * offset  # side by side, so the intervals can be read
        right.errorbar(shift, g["delta"], yerr=[g["delta"] - g["delta_low"], g["delta_high"] - g["delta"]], marker="o",
                       color=color, capsize=2, label=f"r={r}")
    full = gaps.drop_duplicates("step").sort_values("step")
    left.plot(full["step"], full["full"], color=FULL_COLOR, lw=2, marker="s", label="full FT")
    right.axhline(0, color=FULL_COLOR, lw=1)
    right.axhline(-margin, color="red", ls="--", lw=1, label=f"−margin ({margin:g})")
    left.set_ylabel(f"tuning split: {label}")
    right.set_ylabel(f"LoRA − full FT on the tuning split ({gaps['unit'].iloc[0]})")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    left.set_title(f"{title}: learning curves (mean over seeds)")
    right.set_title("paired gap to full FT, 95 % intervals")
    return save(fig, folder, name)


def metric_vs_lr(agg: pd.DataFrame, title, metric, folder, name) -> Path:
    scale, label = view(metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lora = agg[agg["method"] != "full"]
    for (targets, r), group in lora.groupby(["targets", "r"], sort=True):
        group = group.sort_values("lr")
        ax.errorbar(group["lr"], scale * group["primary_value_mean"], yerr=scale * group["primary_value_ci95"].fillna(0),
                    marker="o", capsize=3, label=f"r={int(r)} {targets}")
    full = agg[agg["method"] == "full"].sort_values("lr")
    if len(full):
        ax.errorbar(full["lr"], scale * full["primary_value_mean"], yerr=scale * full["primary_value_ci95"].fillna(0),
                    marker="s", color=FULL_COLOR, lw=2, capsize=3, label="full FT")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{title}: {metric} against learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, folder, name)


def overview(panels: list[tuple[str, pd.DataFrame, pd.Series | None, str]], folder: Path, name: str) -> Path:
    """Small multiples: metric against trainable parameters, one panel per task."""
    cols = min(3, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    for ax, (title, points, full, metric) in zip(axes.flat, panels):
        scale, label = view(metric)
        for series, group in points.groupby("series", sort=True):
            ax.plot(group["params_trainable_mean"], scale * group["primary_value_mean"], marker="o", label=series)
        if full is not None:
            _full_band(ax, full, metric)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("trainable parameters", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return save(fig, folder, name)


def update_spectra(curve: pd.DataFrame, ranks: pd.DataFrame, title: str, folder: Path, name: str) -> Path:
    """Share of ‖ΔW‖²_F in the top k singular values, per matrix type: full FT against each LoRA rank (mean over
    layers and seeds); a LoRA update of rank r reaches 1 by k = r, full FT's far later."""
    about = ranks.drop_duplicates(["run_id", "module"])[["run_id", "module", "method", "r", "matrix", "rank_pattern"]]
    data = curve.merge(about, on=["run_id", "module"])
    data = data[~data["rank_pattern"]]
    matrices = sorted(data["matrix"].unique())
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.4), sharey=True, squeeze=False)
    lora_ranks = sorted(data.loc[data["method"] == "lora", "r"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(lora_ranks))))
    for ax, matrix in zip(axes[0], matrices):
        part = data[data["matrix"] == matrix]
        full = part[part["method"] == "full"].groupby("k")["share"].mean()
        if len(full):
            ax.plot(full.index, full.values, color=FULL_COLOR, lw=2, label="full FT")
        for color, r in zip(colors, lora_ranks):
            line = part[(part["method"] == "lora") & (part["r"] == r)].groupby("k")["share"].mean()
            if len(line):
                ax.plot(line.index, line.values, color=color, lw=1, label=f"LoRA r={int(r)}")
        ax.set_xscale("log", base=2)
        ax.set_title(matrix, fontsize=8)
        ax.set_xlabel("top k singular values")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of ‖ΔW‖² (energy)")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), fontsize=6, loc="lower right")
    fig.suptitle(f"{title}: spectra of the updates ΔW", fontsize=10)
    return save(fig, folder, name)


def effective_rank_heatmaps(ranks: pd.DataFrame, title: str, folder: Path, name: str, level: str = "rank90") -> Path:
    """Effective rank (90 % of the energy) per layer and matrix type, mean over seeds: full FT and the highest LoRA rank."""
    uniform = ranks[~ranks["rank_pattern"]]
    panels = [("full FT", uniform[uniform["method"] == "full"])]
    lora = uniform[uniform["method"] == "lora"]
    if len(lora):
        high = lora["r"].max()
        panels.append((f"LoRA r={int(high)}", lora[lora["r"] == high]))
    grids = [(f"{label}: rank holding 90 % of ‖ΔW‖²", part.groupby(["layer", "matrix"])[level].mean().unstack("matrix"))
             for label, part in panels if len(part)]
    return rank_heatmaps(grids, title, folder, name)


def rank_heatmaps(grids: list[tuple[str, pd.DataFrame]], title: str, folder: Path, name: str) -> Path:
    """Side-by-side heatmaps of a rank per layer (rows) and matrix type (columns), each value written in its cell."""
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.8), squeeze=False)
    for ax, (label, grid) in zip(axes[0], grids):
        image = ax.imshow(grid.values, cmap="magma", aspect="auto")
        low, high = np.nanmin(grid.values), np.nanmax(grid.values)
        for (i, j), value in np.ndenumerate(grid.values):  # light text on the dark lower half of the colour map
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value - low < (high - low) / 2 else "black")
        ax.set_xticks(range(grid.shape[1]), [m.replace("attention.", "attn.") for m in grid.columns], rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(grid.shape[0]), grid.index)
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    return save(fig, folder, name)


def phi_heatmaps(phi: pd.DataFrame, title: str, folder: Path, name: str) -> Path:
    """Subspace similarity φ(i, j) (LoRA paper Figures 3-4), mean over layers and pairs, per comparison and matrix."""
    panels = list(phi.groupby(["comparison", "matrix"], sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, ((comparison, matrix), part) in zip(axes[0], panels):
        grid = part.pivot(index="i", columns="j", values="phi")
        image = ax.imshow(grid.values, cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="upper",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_xlabel("j (directions of the second)")
        ax.set_ylabel("i (directions of the first)")
        ax.set_title(f"{comparison}\n{matrix}", fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"{title}: subspace similarity φ(i, j) of the top right singular vectors of A", fontsize=9)
    return save(fig, folder, name)


def learning_vs_forgetting(points: pd.DataFrame, full: pd.Series | None, title: str, metric: str, folder: Path, name: str) -> Path:
    """Eval metric (learning) against forgetting, each with its 95 % interval over seeds; one point per rank and full FT."""
    scale, label = view(metric)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for series, group in points.groupby("series", sort=True):
        group = group.sort_values("r")
        ax.errorbar(group["forgetting_mean"], scale * group["primary_value_mean"], xerr=group["forgetting_ci95"].fillna(0),
                    yerr=scale * group["primary_value_ci95"].fillna(0), marker="o", capsize=3, lw=0.8, label=series)
        for _, row in group.iterrows():
            ax.annotate(f"r={int(row['r'])}", (row["forgetting_mean"], scale * row["primary_value_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if full is not None and pd.notna(full.get("forgetting_mean")):
        ax.errorbar([full["forgetting_mean"]], [scale * full["primary_value_mean"]], xerr=[np.nan_to_num(full["forgetting_ci95"])],
                    yerr=[scale * np.nan_to_num(full["primary_value_ci95"])], marker="s", color=FULL_COLOR, capsize=3, label="full FT")
    ax.set_xlabel("forgetting (the probe's loss after training; higher = forgot more; see the report)")
    ax.set_ylabel(label)
    ax.set_title(f"{title}: learning against forgetting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, folder, name)


def estimated_memory_vs_rank(ranks: list[int], estimates: list, full, device_bytes: int, title: str, folder: Path, name: str) -> Path:
    """Stacked components of the estimated peak (lora_sweep.estimate.Estimate) at each rank and for full FT, in GiB,
    with the device's memory as a line."""
    labels = [f"r={r}" for r in ranks] + ["full FT"]
    values = np.array([[getattr(e, part) / GIB for part in SPLIT] for e in [*estimates, full]])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = np.zeros(len(labels))
    for i, part in enumerate(SPLIT):
        ax.bar(labels, values[:, i], bottom=bottom, label=part)
        bottom += values[:, i]
    ax.axhline(device_bytes / GIB, color=FULL_COLOR, linestyle="--", label=f"device memory ({device_bytes / GIB:.0f} GiB)")
    ax.set_ylabel("estimated peak memory of a training step (GiB)")
    ax.set_title(f"{title}: estimated peak by component")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, folder, name)
