"""A PNG figure of token credit (matplotlib, Agg canvas; pyplot and the global backend are left alone).

One panel per completion (chosen over rejected for pairs): a bar per token at height r_t, coloured on the
diverging scale of `r2q.views`, token text as x labels, and the cumulative reward q_t = sum_{i<=t} r_i as a
step line. A data set with more than one item gets a last panel with the tokens of largest mean reward.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from ..credit import CompletionCredit, CreditReport
from ..paths import write_atomic
from . import display_piece, reward_rgb, vmax_of


def _label(piece: str) -> str:
    return display_piece(piece).replace("$", r"\$")  # '$' would start mathtext


def _panel(ax, item: CompletionCredit, vmax: float, title: str) -> None:
    n = len(item.rewards)
    xs = list(range(n))
    colours = [tuple(c / 255 for c in reward_rgb(r, vmax)) for r in item.rewards]
    ax.bar(xs, item.rewards, color=colours, edgecolor="#555", linewidth=0.4)
    ax.step(xs, item.cumulative, where="mid", color="#333", linewidth=1.0, label="cumulative q_t")
    ax.axhline(0, color="#999", linewidth=0.6)
    ax.set_xticks(xs)
    ax.set_xticklabels([_label(p) for p in item.tokens], rotation=90 if n > 12 else 0, fontsize=7,
                       fontfamily="monospace")
    ax.set_xlim(-0.6, max(n, 1) - 0.4)
    ax.set_ylabel("reward")
    ax.set_title(_label(title), fontsize=9, loc="left")
    ax.legend(loc="upper left", fontsize=7, frameon=False)


def _top_panel(ax, report: CreditReport, k: int = 8) -> None:
    stats = report.top_positive[:k][::-1] + report.top_negative[:k]
    stats = sorted(stats, key=lambda s: s.mean_reward)
    vmax = max((abs(s.mean_reward) for s in stats), default=1.0) or 1.0
    ys = list(range(len(stats)))
    ax.barh(ys, [s.mean_reward for s in stats], color=[tuple(c / 255 for c in reward_rgb(s.mean_reward, vmax))
                                                         for s in stats], edgecolor="#555", linewidth=0.4)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"'{_label(s.token)}' (n={s.count})" for s in stats], fontsize=7, fontfamily="monospace")
    ax.axvline(0, color="#999", linewidth=0.6)
    ax.set_xlabel("mean token reward over the data set")
    ax.set_title("tokens the model rewards", fontsize=9, loc="left")


def plot_credit(report: CreditReport, path: str | Path, max_items: int = 4, dpi: int = 110) -> Path:
    """Write the figure for the first max_items pairs (or completions) to `path` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[tuple[CompletionCredit, str]] = []
    if report.kind == "pairs":
        for p in report.pairs[:max_items]:
            mark = "right" if p.correct else "WRONG"
            panels.append((p.chosen, f"row {p.row} chosen  R={p.chosen.reward:+.3f}  (margin {p.margin:+.3f}, {mark})"))
            panels.append((p.rejected, f"row {p.row} rejected  R={p.rejected.reward:+.3f}"))
    else:
        panels = [(c, f"row {c.row}  R={c.reward:+.3f}") for c in report.completions[:max_items]]
    n_items = len(report.entries())
    with_top = n_items > 1 and bool(report.top_positive or report.top_negative)
    vmax = vmax_of(item.rewards for item, _ in panels)
    longest = max((len(item.rewards) for item, _ in panels), default=1)
    heights = [2.6] * len(panels) + ([0.5 + 0.16 * (len(report.top_positive[:8]) + len(report.top_negative[:8]))]
                                     if with_top else [])
    fig = Figure(figsize=(min(max(8.0, 0.28 * longest), 40.0), sum(heights) + 0.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (item, title) in zip(axes, panels):
        _panel(ax, item, vmax, title)
    if with_top:
        _top_panel(axes[-1], report)
    fig.suptitle(f"token rewards beta*log pi/pi_ref (beta={report.beta:g}, reference: {report.ref_source})",
                 fontsize=10)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(buf, format="png")
    return write_atomic(path, buf.getvalue())
