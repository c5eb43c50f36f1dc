"""The report's pictures, drawn with matplotlib (Agg: no display needed). Each function takes plain
data and saves one PNG, so it can be called, and looked at, without running the pipeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DPI = 110
# colour-blind-safe (Okabe-Ito): correct labels blue, wrong ones vermillion, left out grey
CORRECT, WRONG, PLAIN, DROPPED, REFERENCE = "#0072B2", "#D55E00", "#0072B2", "#BBBBBB", "#555555"
MAX_ANNOTATED_CLASSES = 20  # above this a confusion matrix shows colour only
MAX_LABELED_CLASSES = 50  # above this class names are left off the axes


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    # bbox "tight": legends placed outside the axes stay in the picture; no software version or
    # date in the file: the same data gives the same bytes
    fig.savefig(path, dpi=DPI, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)


def accuracy_per_round(rounds: pd.DataFrame, supervised: float | None, path: Path) -> None:
    """Test accuracy of each model in loop order; the accuracy of the pseudo-labels each student
    learned from where the pool's truth is known; the supervised-only reference if given."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x = np.arange(len(rounds))
    acc = 100 * rounds["test_accuracy"].to_numpy(float)
    ax.plot(x, acc, "o-", color=PLAIN, lw=2, ms=8, label="test accuracy")
    for xi, value in zip(x, acc, strict=True):
        ax.annotate(
            f"{value:.1f}%", (xi, value), textcoords="offset points", xytext=(0, 9), ha="center"
        )
    values = list(acc)
    kept = 100 * rounds["kept_accuracy"].to_numpy(float)
    if np.isfinite(kept).any():
        ax.plot(x, kept, "s--", color=CORRECT, alpha=0.55, ms=7, label="its pseudo-labels correct")
        values += list(kept[np.isfinite(kept)])
    if supervised is not None:
        ax.axhline(100 * supervised, color=REFERENCE, ls=":", lw=1.5, label="supervised only")
        values.append(100 * supervised)
    labels = [f"{m}\n{a}" for m, a in zip(rounds["model"], rounds["architecture"], strict=True)]
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.5, len(rounds) - 0.5)
    low, high = min(values), max(values)
    pad = max(2.0, 0.15 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad) + 1.5)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Test accuracy per round")
    ax.grid(axis="y", alpha=0.3)
    # below the axes: inside, it would cover a point wherever the accuracies happen to fall
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=9, frameon=False)
    _save(fig, path)


def learning_curves(histories: dict[str, pd.DataFrame], path: Path) -> None:
    """Training loss and validation accuracy per epoch, one line per trained network."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(histories), 1)))
    for (name, history), colour in zip(histories.items(), colours, strict=True):
        loss_ax.plot(history["epoch"], history["train_loss"], color=colour, label=name)
        acc_ax.plot(history["epoch"], 100 * history["val_accuracy"], color=colour, label=name)
    loss_ax.set(title="Training loss", xlabel="epoch", ylabel="loss (noised images)")
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    _save(fig, path)


def pseudo_label_round(
    student: str,
    teacher: str,
    table: pd.DataFrame,
    classes: list[str],
    threshold: float,
    trained_per_class: dict[str, int] | None,
    path: Path,
    score: str = "energy",
    cut: float | None = None,
) -> None:
    """One round's pseudo-labels. Left: the teacher's confidence over the pool, the threshold, and
    (demo) which labels were right. Middle: how many images of each class the student got.
    Right: the pool's out-of-class ``score`` column (``energy`` or ``knn_distance``; high:
    unlike the labeled classes) and, with the out-of-class filter, its ``cut`` and the images it
    held out.

    ``table``: one row per pool image with ``pred`` (class index), ``confidence``, ``score``,
    ``kept``, ``correct`` (bool, or all NaN where the truth is unknown) and, with the filter,
    ``foreign``."""
    fig, (hist_ax, class_ax, score_ax) = plt.subplots(
        1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.1, 1, 0.9]}
    )
    score_panel(score_ax, table, teacher, score, cut)
    bins = np.linspace(0.0, 1.0, 21)
    known = table["correct"].notna().all() and len(table) > 0
    if known:
        correct = table["correct"].astype(bool)
        hist_ax.hist(
            [table["confidence"][correct], table["confidence"][~correct]],
            bins=bins,
            stacked=True,
            color=[CORRECT, WRONG],
            label=["label right", "label wrong"],
        )
    else:
        hist_ax.hist(table["confidence"], bins=bins, color=PLAIN, label="pool images")
    hist_ax.axvspan(0.0, threshold, color=DROPPED, alpha=0.35, lw=0, label="left out")
    hist_ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    kept = int(table["kept"].sum())
    hist_ax.set(
        xlim=(0, 1),
        xlabel=f"{teacher}'s confidence",
        ylabel="pool images",
        title=f"{student}: {kept}/{len(table)} pseudo-labels kept",
    )
    hist_ax.legend(loc="upper left", fontsize=9)

    y = np.arange(len(classes))
    kept_rows = table[table["kept"].astype(bool)]
    counts = np.bincount(kept_rows["pred"].to_numpy(int), minlength=len(classes))
    if known:
        right = np.bincount(
            kept_rows["pred"].to_numpy(int),
            weights=kept_rows["correct"].astype(float).to_numpy(),
            minlength=len(classes),
        )
        class_ax.barh(y, right, color=CORRECT, label="right")
        class_ax.barh(y, counts - right, left=right, color=WRONG, label="wrong")
    else:
        class_ax.barh(y, counts, color=PLAIN, label="kept")
    longest = counts.max(initial=0)
    if trained_per_class is not None:  # class balancing: what the student trained on
        trained = [trained_per_class.get(c, 0) for c in classes]
        class_ax.plot(trained, y, "k|", ms=14, mew=2, label="after balancing")
        longest = max(longest, max(trained, default=0))
    if len(classes) <= MAX_ANNOTATED_CLASSES:
        for yi, n in zip(y, counts, strict=True):
            class_ax.annotate(
                str(n), (n, yi), textcoords="offset points", xytext=(3, 0), va="center", fontsize=8
            )
    class_ax.set_xlim(0, max(longest, 1) * 1.12)  # room for the counts
    class_ax.set(xlabel="pseudo-labels kept", title=f"Kept per class (the class {teacher} gave)")
    if len(classes) <= MAX_LABELED_CLASSES:
        class_ax.set_yticks(y, classes)
    class_ax.invert_yaxis()
    class_ax.grid(axis="x", alpha=0.3)
    class_ax.legend(loc="lower right", fontsize=9)
    _save(fig, path)


SCORE_LABELS = {
    "energy": "free energy",
    "knn_distance": "feature distance to the nearest labeled images",
}


def score_panel(
    ax: plt.Axes, table: pd.DataFrame, teacher: str, score: str, cut: float | None
) -> None:
    if score not in table or len(table) == 0:
        ax.set_axis_off()
        return
    values = table[score].to_numpy(float)
    bins = np.linspace(values.min(), values.max() + 1e-6, 31)
    if "foreign" in table:
        foreign = table["foreign"].astype(bool).to_numpy()
        ax.hist(
            [values[~foreign], values[foreign]],
            bins=bins,
            stacked=True,
            color=[PLAIN, WRONG],
            label=["passed", f"held out as foreign ({foreign.sum()})"],
        )
    else:
        ax.hist(values, bins=bins, color=PLAIN, label="pool images")
    if cut is not None:
        ax.axvline(cut, color="black", ls="--", lw=1, label=f"cut {cut:.2f} (from validation)")
    ax.set(
        xlabel=f"{teacher}'s {SCORE_LABELS.get(score, score)} (high: unlike the classes)",
        ylabel="pool images",
        title="Out of class? (pseudo_label.ood_filter)",
    )
    ax.legend(loc="upper right", fontsize=9)  # fmt: skip


def confusion(actual: list[str], predicted: list[str], classes: list[str], title: str, path: Path):
    """Counts of (true class, predicted class); the colour is the share of the true class's row,
    so a rare class's errors show as clearly as a common one's."""
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    matrix = np.zeros((k, k), dtype=int)
    np.add.at(matrix, ([index[a] for a in actual], [index[p] for p in predicted]), 1)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(12.0, max(5.0, 0.5 * k + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if k <= MAX_ANNOTATED_CLASSES:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    white = shares[i, j] > 0.55
                    ax.text(
                        j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if white else "black",
                    )  # fmt: skip
    if k <= MAX_LABELED_CLASSES:
        ax.set_xticks(range(k), classes, rotation=90 if max(map(len, classes)) > 3 else 0)
        ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    _save(fig, path)


def reliability_diagram(bins: dict[str, pd.DataFrame], path: Path) -> None:
    """Accuracy against confidence per confidence bin, one line per model: on the diagonal a
    model's confidence means what it says; below it, the model is over-confident."""
    fig, ax = plt.subplots(figsize=(6.0, 5.2))
    ax.plot([0, 1], [0, 1], linestyle=":", color=REFERENCE, label="calibrated")
    for name, table in bins.items():
        used = table[table["images"] > 0]
        ax.plot(used["confidence"], used["accuracy"], marker="o", markersize=3, label=name)
    ax.set(xlabel="confidence (mean of the bin)", ylabel="accuracy in the bin", xlim=(0, 1),
           ylim=(0, 1.02), title="Reliability on the test set")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def class_scores(scores: pd.DataFrame, title: str, path: Path, most: int = 30) -> None:
    """Recall and precision per class (the weakest by recall first; at most ``most`` classes)."""
    shown = scores.sort_values(["recall", "class"]).head(most).iloc[::-1]
    height = max(3.0, 0.28 * len(shown) + 1.5)
    fig, ax = plt.subplots(figsize=(7.0, height))
    y = np.arange(len(shown))
    ax.barh(y + 0.2, shown["recall"], height=0.4, color=PLAIN, label="recall")
    ax.barh(y - 0.2, shown["precision"], height=0.4, color=DROPPED, label="precision")
    ax.set_yticks(y, shown["class"].astype(str))
    ax.set(xlim=(0, 1), xlabel="share of the test images", title=title)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
