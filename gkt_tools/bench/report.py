"""The benchmark report: results as JSON, a Markdown summary, and PNG plots (matplotlib)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SYSTEMS = {"gkt": "GKT, echo models", "redis_floor": "bare Redis stream", "celery_floor": "bare Celery task"}


def write_report(results: Mapping[str, Any], directory: Path) -> list[Path]:
    """Write `results.json`, `results.md` and one PNG per plot into `directory`; returns the paths.

    A run of some scenarios replaces those in an existing `results.json` and keeps the others, each
    scenario carrying the `meta` (command, machine, date, load) of the run that measured it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    data, table = directory / "results.json", directory / "results.md"
    earlier = json.loads(data.read_text()) if data.exists() else {}
    meta = results.get("meta", {})
    results = {
        **earlier,
        **{k: {**v, "meta": meta} if isinstance(v, dict) and k != "meta" else v for k, v in results.items()},
    }
    data.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    plots = _plots(results, directory)
    table.write_text(markdown(results, plots=[p.name for p in plots]))
    return [data, table, *plots]


def markdown(results: Mapping[str, Any], *, plots: list[str] | None = None) -> str:
    """The report as Markdown tables, one section per scenario that ran."""
    meta = results["meta"]
    lines = [
        "# GKT Serve benchmark results",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; load average (1/5/15 min) "
        f"{_load(meta.get('load_average_at_start'))} at the start, {_load(meta.get('load_average_at_end'))} at the end.",
        "",
    ]
    if "overhead" in results:
        lines += _overhead(results["overhead"])
    if "batching" in results:
        b = results["batching"]
        lines += [
            "## Dynamic batching efficiency (teacher only, `Guide`)",
            "",
            "| measure | value |",
            "|---|---|",
            f"| online: jobs/s through the gateway (concurrency {b['online']['concurrency']}) "
            f"| {b['online']['throughput_rps']:.2f} |",
            f"| online: mean teacher batch size | {b['online']['mean_batch_size']:.2f} |",
            f"| offline: jobs/s, batched generate at batch {b['batch_size']} | {b['offline_rps']:.2f} |",
            f"| offline without prefix reuse: jobs/s | {_f(b.get('offline_no_prefix_rps'))} |",
            f"| **efficiency** (online / offline) | **{b['efficiency']:.3f}** |",
            "",
        ]
    if "student" in results:
        s = results["student"]
        lines += [
            "## Student overhead (student alone, batch 1, greedy)",
            "",
            "| measure | value |",
            "|---|---|",
            f"| jobs | {s['jobs']} ({s['tokens']} tokens) |",
            f"| student job time (sum of `student_ms`) | {s['student_s']:.2f} s |",
            f"| bare `model.generate`, same prompts and lengths | {s['generate_s']:.2f} s |",
            f"| **ratio** (job / generate) | **{s['ratio']:.3f}** |",
            "",
        ]
    if "student_capacity" in results:
        lines += _student_capacity(results["student_capacity"])
    if "determinism" in results:
        d = results["determinism"]
        lines += [
            f"## Seeded determinism (bundled student, {d['requests']} requests, 16 tokens each)",
            "",
            f"Same text alone and in a changing batch of up to {d['max_batch']}: **{d['identical']} of "
            f"{d['requests']}** ({d['identical_greedy']} of {d['greedy']} greedy, {d['identical_sampled']} of "
            f"{d['sampled']} sampled). Alone {d['alone_s']:.0f} s, batched {d['batched_s']:.0f} s.",
            "",
        ]
    if "teacher_pipeline" in results:
        lines += _teacher_pipeline(results["teacher_pipeline"])
    if "gkt" in results:
        g = results["gkt"]
        lines += [
            f"## GKT vs teacher alone vs student alone ({g['questions']} {g['task']} questions, "
            f"concurrency {g['concurrency']})",
            "",
            "| run | wall-clock s | vs student alone |",
            "|---|---|---|",
        ]
        for name in ("student_alone", "teacher_alone", "gkt"):
            lines.append(f"| {name.replace('_', ' ')} | {g[name]['wall_s']:.1f} | {g['ratios'][name]:.2f}x |")
        lines += [
            "",
            f"GKT / teacher alone: **{g['ratios']['gkt_vs_teacher']:.2f}x** the time "
            f"(Speed Up {g['teacher_alone']['wall_s'] / g['gkt']['wall_s']:.2f}x).",
            "",
        ]
    lines += [f"![{name}]({name})" for name in plots or []]
    return "\n".join(lines) + "\n"


def _overhead(o: Mapping[str, Any]) -> list[str]:
    u = o.get("unloaded")
    lines = ["## Orchestration overhead (echo backends: zero-cost models)", ""]
    if u is None:  # `--addr`: a running gateway's sweep, without the floors
        lines += [f"Saturation: {o['saturation_rps']['gkt']:.0f} jobs/s.", ""]
    else:
        lines += [
            f"Unloaded p50: GKT {u['gkt_p50_ms']:.2f} ms, bare Redis stream {u['redis_floor_p50_ms']:.2f} ms, "
            f"bare Celery task {u['celery_floor_p50_ms']:.2f} ms. "
            f"Saturation: GKT {o['saturation_rps']['gkt']:.0f} jobs/s, Celery floor "
            f"{o['saturation_rps']['celery_floor']:.0f} tasks/s, Redis floor {o['saturation_rps']['redis_floor']:.0f} round trips/s.",
            "",
        ]
    lines += [
        "| system | concurrency | jobs/s | p50 ms | p90 ms | p99 ms | TTFT p50 ms | mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, runs in o["sweep"].items():
        for r in runs:
            ttft = r["ttft_ms"]["p50"] if r["ttft_ms"] else math.nan
            lines.append(
                f"| {SYSTEMS.get(system, system)} | {r['concurrency']} | {r['throughput_rps']:.0f} "
                f"| {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p90']:.2f} | {r['latency_ms']['p99']:.2f} "
                f"| {_f(ttft)} | {_f(r['mean_batch_size'])} |"
            )
    lines += [
        "",
        "Where GKT's time goes (mean ms per job, from the replies' stage timings):",
        "",
        "| concurrency | queue wait | teacher | student wait | student | total |",
        "|---|---|---|---|---|---|",
    ]
    for r in o["sweep"].get("gkt", []):
        m = r["stage_mean_ms"]
        lines.append(
            f"| {r['concurrency']} | {_f(m.get('queue_wait_ms'))} | {_f(m.get('teacher_ms'))} "
            f"| {_f(m.get('student_wait_ms'))} | {_f(m.get('student_ms'))} | {_f(m.get('total_ms'))} |"
        )
    lines += ["", "Teacher batch sizes (jobs per size):", ""]
    for r in o["sweep"].get("gkt", []):
        lines.append(f"- concurrency {r['concurrency']}: {r['batch_sizes']}")
    return [*lines, ""]


def _teacher_pipeline(t: Mapping[str, Any]) -> list[str]:
    server = t["server"]
    limits = "/".join(str(n) for n in t["guidance_tokens"])
    if "measured_lengths" in t:
        measured = t["measured_lengths"]
        tasks = ", ".join(
            f"{name} N = {task['max_guidance_tokens']}: mean {task['mean']:.1f}, {task['at_limit']:.0%} at N"
            for name, task in measured["tasks"].items()
        )
        ending = (
            f"a length drawn from those {server['lengths']} guidance had on the first {measured['questions']} "
            f"questions of each task ({tasks}); at these lengths a teacher keeping every row busy can gain at "
            f"most **{t['full_rows_vs_one_batch_ceiling']:.2f}x** over one batch at a time"
        )
    else:
        ending = f"a log-normal number of tokens (median {server['median_tokens']}, σ {server['sigma']})"
    lines = [
        f"## Teacher pipelining (fake continuously batching server: {server['step_ms']} ms a step, up to "
        f"{server['rows']} rows)",
        "",
        f"`Guide` jobs with guidance limits {limits} tokens in turn, each answer ending on its own after "
        f"{ending} when that comes first; {t['concurrency']} closed-loop clients. `batched`: batches of {server['rows']}; `pipelined`: "
        f"{server['rows']} jobs in flight; `pipelined-2m`: {2 * server['rows']}.",
        "",
        *(
            f"- {mode} / batched: throughput **{r['throughput']:.2f}x**, p50 latency {r['p50']:.2f}x, "
            f"p99 latency **{r['p99']:.2f}x**"
            for mode, r in t["vs_batched"].items()
        ),
        "",
        "| teacher | jobs | jobs/s | p50 ms | p99 ms | rows per server step | waiting for a row | server rows busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in t["runs"].items():
        lines.append(
            f"| {mode} | {r['ok']} of {r['requests']} | {r['throughput_rps']:.2f} | {r['latency_ms']['p50']:.0f} "
            f"| {r['latency_ms']['p99']:.0f} | {r['mean_rows_per_step']:.2f} | {r['mean_waiting_per_step']:.2f} "
            f"| {r['server_row_utilization']:.0%} |"
        )
    return [*lines, ""]


def _student_capacity(c: Mapping[str, Any]) -> list[str]:
    lines = [
        f"## Student capacity (bundled student, GSM8K, {c['tokens_per_job']} tokens per job, sampled)",
        "",
        f"Tokens/s at concurrency 16, max batch {c['max_batch']} / max batch 1: "
        f"**{_f(c['tokens_per_s_ratio_at_16'])}x**; p50 latency at concurrency 1, same ratio: "
        f"**{_f(c['p50_ratio_at_1'])}x**.",
        "",
        "| max batch | concurrency | jobs/s | tokens/s | p50 ms | p99 ms | mean student wait ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, runs in c["runs"].items():
        size = c["max_batch"] if label == "batched" else 1
        for r in runs:
            lines.append(
                f"| {size} | {r['concurrency']} | {r['throughput_rps']:.2f} | {r['tokens_per_s']:.1f} "
                f"| {r['latency_ms']['p50']:.0f} | {r['latency_ms']['p99']:.0f} "
                f"| {_f(r['stage_mean_ms'].get('student_wait_ms'))} |"
            )
    return [*lines, ""]


def _load(values: Any) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _f(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _plots(results: Mapping[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    if "overhead" in results:
        sweep = results["overhead"]["sweep"]
        for metric, ylabel, name in (
            ("latency", "latency p50 / p99 (ms)", "overhead_latency.png"),
            ("throughput", "throughput (requests/s)", "overhead_throughput.png"),
        ):
            fig, ax = plt.subplots(figsize=(6, 4))
            for system, runs in sweep.items():
                xs = [r["concurrency"] for r in runs]
                if metric == "latency":
                    line = ax.plot(
                        xs, [r["latency_ms"]["p50"] for r in runs], marker="o", label=f"{SYSTEMS[system]} p50"
                    )
                    ax.plot(
                        xs,
                        [r["latency_ms"]["p99"] for r in runs],
                        ls="--",
                        color=line[0].get_color(),
                        label=f"{SYSTEMS[system]} p99",
                    )
                else:
                    ax.plot(xs, [r["throughput_rps"] for r in runs], marker="o", label=SYSTEMS[system])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients (closed loop)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(directory / name, dpi=100)
            plt.close(fig)
            paths.append(directory / name)
    distributions = _batch_distributions(results)
    if distributions:
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(distributions)
        for i, (label, counts) in enumerate(distributions.items()):
            sizes = [int(s) for s in counts]
            ax.bar([s + i * width for s in sizes], list(counts.values()), width=width, label=label)
        ax.set_xlabel("teacher batch size")
        ax.set_ylabel("jobs")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / "batch_sizes.png", dpi=100)
        plt.close(fig)
        paths.append(directory / "batch_sizes.png")
    return paths


def _batch_distributions(results: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for r in results.get("overhead", {}).get("sweep", {}).get("gkt", []):
        found[f"echo, concurrency {r['concurrency']}"] = r["batch_sizes"]
    if "batching" in results:
        found["gemma-3-270m, Guide"] = results["batching"]["online"]["batch_sizes"]
    return {label: counts for label, counts in found.items() if counts}
