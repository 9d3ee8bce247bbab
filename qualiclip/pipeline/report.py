"""The report of one retraining run, as markdown: the promotion decision (both figures on the same
images, the difference, its interval, the confidence, the outcome: `promotion.decision_markdown`,
the text the model version's description starts with), the headline metrics of the new model
against the champion re-scored on the same images and the zero-shot baseline of its own
evaluation, each stage's state, and where the run and the model are in MLflow. The retraining flow publishes it as a Prefect artifact; any markdown viewer shows it.
"""

from __future__ import annotations

import math

from .promotion import BASELINE_KEY, HEADLINES, Decision, decision_markdown, flat_metrics

HEADLINE = ("srcc", "plcc", "krcc", "srcc_within")  # per evaluation block (synthetic, each dataset)


def headline_keys(metrics: dict) -> list[str]:
    """The dotted keys of the headline metrics of each evaluation block, the baseline's excluded."""
    return [
        f"{block}.{key}"
        for block, values in metrics.items()
        if block != BASELINE_KEY and isinstance(values, dict)
        for key in HEADLINE
        if isinstance(values.get(key), (int, float))
    ]


def run_report(decision: Decision, metrics: dict, stages: dict[str, str]) -> str:
    """The markdown report of a run whose stages ended in ``stages`` and whose model got ``decision``."""
    flat = flat_metrics(metrics)
    champion = (
        f"champion v{decision.champion_version} (re-scored)" if decision.champion_version else "champion (none yet)"
    )
    lines = [
        f"## qualiclip retraining: {HEADLINES[decision.outcome]}",
        "",
        *decision_markdown(decision),
        "",
        decision.reason,
        "",
        f"| metric | this model v{decision.version} | {champion} | zero-shot baseline |",
        "|---|---:|---:|---:|",
    ]
    for key in headline_keys(metrics):
        name = f"**{key}** (promotion)" if key == decision.metric else key
        lines.append(
            f"| {name} | {_fmt(flat.get(key))} | {_fmt(decision.champion_metrics.get(key))} "
            f"| {_fmt(flat.get(f'{BASELINE_KEY}.{key}'))} |"
        )
    if decision.min_value is not None:
        lines += ["", f"Floor `promotion.min_value`: {decision.min_value}"]
    lines += ["", "Stages: " + ", ".join(f"{stage} {state}" for stage, state in stages.items()), ""]
    return "\n".join(lines + mlflow_links(decision)) + "\n"


def mlflow_links(d: Decision) -> list[str]:
    """Where the model version and its run are: URIs for every store, web links for a server."""
    web = d.tracking_uri.rstrip("/") if d.tracking_uri.startswith(("http://", "https://")) else None
    model = f"`models:/{d.model}/{d.version}`"
    lines = [f"- model version: {model}" + (f" — [open]({web}/#/models/{d.model}/versions/{d.version})" if web else "")]
    if d.run_id:
        page = f"{web}/#/experiments/{d.experiment_id}/runs/{d.run_id}" if web else None
        lines.append(f"- MLflow run: `{d.run_id}`" + (f" — [open]({page})" if page else ""))
    lines.append(
        f"- tracking store: `{d.tracking_uri}`"
        + ("" if web else f" (browse: `mlflow ui --backend-store-uri {d.tracking_uri}`)")
    )
    return lines


def _fmt(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4f}"
