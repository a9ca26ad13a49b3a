"""The replay's report folder: report.json (everything measured), report.md (tables and a summary)
and PNG plots (accuracy per block, model bytes over the replay, update cost per block)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from simulator.evaluation import EVALUATION_RULE  # noqa: E402
from simulator.replay import MODELS, UPDATE_COST_RULE  # noqa: E402

PLOTS = {"accuracy": "accuracy.png", "bytes": "model_bytes.png", "cost": "update_cost.png"}
STYLE = {"static": dict(marker="o", linestyle="-"), "retrain": dict(marker="s", linestyle="--"),
         "stream": dict(marker="^", linestyle=":")}  # distinct, so that equal values stay visible


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def summarise(report: dict) -> dict:
    """Averages over blocks per model, the stream/retrain accuracy ratio and the retrain/stream cost
    ratio (both models' update seconds summed over the same blocks)."""
    blocks = report["blocks"]

    def per_model(key: str, reduce) -> dict[str, float]:
        return {m: reduce([b["models"][m][key] for b in blocks]) for m in MODELS}

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    recall = per_model("recall@20", mean)
    cost = per_model("update_seconds", sum)
    return {
        "avg_recall@20": recall,
        "avg_ndcg@20": per_model("ndcg@20", mean),
        "update_seconds": cost,
        "stream_retrain_recall_ratio": _ratio(recall["stream"], recall["retrain"]),
        "retrain_stream_cost_ratio": _ratio(cost["retrain"], cost["stream"]),
        "stream_beats_static": [b["block"] for b in blocks
                                if b["models"]["stream"]["recall@20"] > b["models"]["static"]["recall@20"]],
    }


def _plot(report: dict, out: Path) -> None:
    blocks = report["blocks"]
    x = [b["block"] for b in blocks]
    title = f"{report['dataset']} ({report['scenario']['name']})"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("recall@20", "ndcg@20")):
        for m in MODELS:
            ax.plot(x, [b["models"][m][key] for b in blocks], label=m, **STYLE[m])
        ax.set(xlabel="block", ylabel=key, title=f"{key} per block, {title}", xticks=x)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["accuracy"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    seen = [b["start"] for b in blocks]
    final = report["stream_final"]
    for m in MODELS:
        # the stream also has its size after the last block
        tail = ([report["events"]], [final["bytes_model"]]) if m == "stream" else ([], [])
        ax.plot(seen + tail[0], [b["models"][m]["bytes_model"] for b in blocks] + tail[1], label=m, **STYLE[m])
    ax.set(xlabel="events replayed (base block included)", ylabel="model bytes", title=f"model size, {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["bytes"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(MODELS)
    for j, m in enumerate(MODELS):
        ax.bar([v + (j - 1) * width for v in x], [b["models"][m]["update_seconds"] for b in blocks], width, label=m)
    ax.set(xlabel="block", ylabel="seconds spent updating", title=f"update cost per block, {title}", xticks=x)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["cost"], dpi=100)
    plt.close(fig)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    s, base, cfg = report["summary"], report["base"], report["train_config"]
    n_blocks = len(report["blocks"])
    rate = f"{report['rate']:g} events/s" if report["rate"] else "as fast as possible"
    lines = [
        f"# Replay of {report['dataset']}",
        "",
        f"- **Events**: {report['events']:,} ({report['users']:,} users, {report['items']:,} items).",
        f"- **Order**: {report['order']}.",
        f"- **Scenario**: `{report['scenario']['name']}`: {report['scenario']['description']}.",
        f"- **Protocol**: the base block (first {base['events']:,} events; {base['users']:,} users, "
        f"{base['items']:,} items) trains the base model offline ({cfg['method']}, {cfg['bits']} bits, "
        f"dim {cfg['dim']}, {cfg['epochs']} epochs, batch {cfg['batch_size']}, seed {cfg['seed']}); the rest is "
        f"{n_blocks} blocks, each evaluated with every model as it was before the block, then streamed in.",
        f"- **Evaluation**: {EVALUATION_RULE}.",
        f"- **Update cost**: {UPDATE_COST_RULE}.",
        f"- **Transport**: {report['transport']}; `gnaq-stream consume` as a separate process; "
        f"rate {rate}.",
        "",
        "| block | events | new users | new items | eval users | eval interactions | model | Recall@20 | NDCG@20 "
        "| unseen user/item interactions | update s | model bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in report["blocks"]:
        for m in MODELS:
            r = b["models"][m]
            lines.append(f"| {b['block']} | {b['events']:,} | {b['new_users']:,} | {b['new_items']:,} | "
                         f"{b['eval_users']:,} | {b['eval_interactions']:,} | {m} | {r['recall@20']:.4f} | "
                         f"{r['ndcg@20']:.4f} | {r['unknown_interactions']:,} | {r['update_seconds']:.2f} | "
                         f"{r['bytes_model']:,} |")
    t = report["timings"]
    lines += [
        "",
        "## Summary",
        "",
        "| model | average Recall@20 | average NDCG@20 | update seconds (all blocks) |",
        "|---|---|---|---|",
        *(f"| {m} | {s['avg_recall@20'][m]:.4f} | {s['avg_ndcg@20'][m]:.4f} | {s['update_seconds'][m]:.2f} |"
          for m in MODELS),
        "",
        f"- stream / retrain average Recall@20: {_pct(s['stream_retrain_recall_ratio'])}",
        "- retrain / stream update cost: " + ("n/a (no update before any block)"
                                              if s["retrain_stream_cost_ratio"] is None
                                              else f"{s['retrain_stream_cost_ratio']:.1f}x"),
        f"- stream beats static on block(s): {', '.join(map(str, s['stream_beats_static'])) or 'none'}",
        f"- the learner also streamed the last block in {report['stream_final']['last_block_update_seconds']:.2f} s; "
        f"its store ends with {report['stream_final']['events_in_store']:,} events "
        f"({report['stream_final']['bytes_model']:,} model bytes)",
        f"- time: prepare {t.get('prepare_seconds', 0.0):.1f} s, base training {t['base_train_seconds']:.1f} s, "
        f"retraining {t['retrain_seconds']:.1f} s, streaming (learner) {t['stream_seconds']:.1f} s, "
        f"evaluation {t['evaluate_seconds']:.1f} s, whole replay {t['total_seconds']:.1f} s",
        "",
        f"![accuracy per block]({PLOTS['accuracy']})",
        f"![model bytes]({PLOTS['bytes']})",
        f"![update cost per block]({PLOTS['cost']})",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> dict:
    """Add the summary, write report.json, report.md and the plots into `out`; the full report."""
    report = {**report, "summary": summarise(report)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out)
    (out / "report.md").write_text(markdown(report))
    return report
