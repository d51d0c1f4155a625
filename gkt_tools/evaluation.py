"""`gkt eval`: the command line of the evaluation, turning arguments into a plan, a runner and a report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gkt import paper
from gkt.config import CommonSettings
from gkt.evaluation.archive import RECORDS_ROOT, render
from gkt.evaluation.datasets import DATASETS, DataError, load_dataset
from gkt.evaluation.evaluate import Runner, evaluate, report
from gkt.evaluation.oracle import ORACLE, check_oracle_task
from gkt.evaluation.plan import EvalPlan
from gkt.evaluation.records import RecordStore
from gkt.evaluation.report import markdown_table
from gkt.jobs import GuidanceMode, Task
from gkt.prompts import ExemplarSet
from gkt_tools.arguments import UINT32_MAX, real_number, whole_number
from gkt_tools.connection import ConnectionOptionError, add_connection_arguments, connection_from_args
from gkt_tools.settings import ToolSettings

DEFAULT_MODELS = "gemma-3-270m,smollm2-135m-instruct"
_BASELINES = {"student": GuidanceMode.NONE, "teacher": GuidanceMode.FULL}


def add_arguments(parser: argparse.ArgumentParser, *, default_addr: str) -> None:
    """The options of `gkt eval`; `default_addr`: the gateway of live runs."""
    parser.add_argument(
        "runner",
        nargs="?",
        choices=["offline", "live", "report"],
        default="offline",
        help="offline: library calls in this process (batched teacher, students at batch 1); "
        "live: every question through a running gateway over gRPC; "
        "report: print every table and statistic of the kept records (--records), and how the rows two runs "
        "share compare text by text, running nothing",
    )
    parser.add_argument(
        "--records",
        type=Path,
        default=RECORDS_ROOT,
        help="report: the kept runs, one directory each with plan.json and records.jsonl.gz "
        "(default: docs/results/records)",
    )
    parser.add_argument(
        "--dataset",
        choices=[t.value for t in DATASETS],
        default=Task.CSQA.value,
        help="the dataset to evaluate on (default: csqa)",
    )
    parser.add_argument(
        "--guidance",
        default=GuidanceMode.CUTOFF.value,
        help=f"comma-separated GKT modes among {', '.join(paper.GKT_MODES)} (default: cutoff), and/or "
        f"{ORACLE}: offline evaluation only, never served — the first N tokens of the dataset's reference "
        "solution (GSM8K, AQuA) in place of the teacher's, an upper bound on what guidance gives the student",
    )
    parser.add_argument(
        "--guidance-tokens",
        dest="max_guidance_tokens",
        help="comma-separated guidance lengths N, e.g. 10,20,30,40 (default: the paper's N: "
        + _per_dataset(lambda d: d.max_guidance_tokens)
        + ")",
    )
    parser.add_argument(
        "--student-tokens",
        type=whole_number(1, UINT32_MAX),
        help="student max new tokens (default: the paper's: "
        + _per_dataset(lambda d: d.student_max_new_tokens)
        + ")",
    )
    parser.add_argument(
        "--baselines",
        default=",".join(_BASELINES),
        help="comma-separated rows without guidance: student (alone), teacher (alone); default: both",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the student-alone and teacher-alone rows"
    )
    parser.add_argument(
        "--limit", type=whole_number(1), help="the first N questions of the dataset (default: all)"
    )
    parser.add_argument(
        "--seed", type=whole_number(0), default=0, help="run seed; each question's seed derives from it"
    )
    parser.add_argument("--greedy", action="store_true", help="temperature 0 for teacher and student")
    parser.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"TEACHER,STUDENT: aliases, HF ids or directories ({DEFAULT_MODELS}); live: the labels of "
        "the models the server runs",
    )
    parser.add_argument(
        "--exemplars",
        choices=[e.value for e in ExemplarSet],
        default=ExemplarSet.CORRECTED.value,
        help="corrected (default) or paper: the published exemplars with their two label errors",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the datasets and SHA256SUMS (default: $GKT_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument(
        "--out", type=Path, help="output directory, resumable (default: runs/<dataset>-<runner>)"
    )
    parser.add_argument(
        "--batch-size",
        type=whole_number(1, 512),
        default=paper.TEACHER_BATCH_SIZE,
        help=f"offline: teacher batch size (default: {paper.TEACHER_BATCH_SIZE}, the paper's smallest)",
    )
    parser.add_argument(
        "--student-batch-size",
        type=whole_number(1, 512),
        default=1,
        help="offline: students of a teacher batch decoded together, at most --batch-size (default: 1, the "
        "paper's), in less time; each row samples from its own seed, so its text is the same as alone as "
        "far as floating point allows; each student's time is its share of its batch's",
    )
    parser.add_argument(
        "--concurrency", type=whole_number(1, 1024), default=8, help="live: requests in flight at once"
    )
    parser.add_argument(
        "--timeout",
        type=real_number(0, open_low=True),
        default=600.0,
        help="live: deadline per request in seconds",
    )
    parser.add_argument("--device", default="cpu", help="offline: torch device")
    parser.add_argument("--dtype", default="float32", help="offline: float32, bfloat16 or float16")
    parser.add_argument(
        "--threads", type=whole_number(0, 1024), default=0, help="offline: torch threads (0: torch's default)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the records already in --out; run nothing",
    )
    add_connection_arguments(parser, default_addr=default_addr, title="live: connecting to the gateway")


def _per_dataset(value: Callable[[paper.TaskDefaults], int]) -> str:
    """A paper setting of every dataset, for a help text: `gsm8k 40, csqa 30, aqua 20`."""
    return ", ".join(f"{task.value} {value(paper.TASK_DEFAULTS[task])}" for task in DATASETS)


def run(args: argparse.Namespace, *, settings: ToolSettings) -> int:
    """Run the evaluation the arguments describe; print the table; 2 on a usage or data error."""
    if args.runner == "report":
        try:
            print(render(args.records), end="")
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        plan = build_plan(args)
        dataset = load_dataset(
            task=plan.task, data_dir=settings.data_dir_for(args.data_dir), limit=args.limit
        )
        out = args.out or Path("runs") / f"{plan.task.value}-{plan.runner}"
        store = RecordStore(out, plan=plan)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report_only:
        summary = report(plan=plan, dataset=dataset, store=store)
        print(markdown_table(summary))
        return 0
    try:
        runner: Runner = (
            _live_runner(args, plan, api_key=settings.api_key_value)
            if plan.runner == "live"
            else _offline_runner(args, plan, cache_dir=CommonSettings().model_cache_dir)
        )
    except ConnectionOptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = evaluate(
            plan=plan,
            dataset=dataset,
            store=store,
            runner=runner,
            chunk_size=args.concurrency if plan.runner == "live" else args.batch_size,
            progress=not args.no_progress,
        )
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()
    print(markdown_table(summary))
    print(f"records, summary.json, table.md and plots in {out}")
    return 0


def build_plan(args: argparse.Namespace) -> EvalPlan:
    """The plan the arguments ask for, with the paper's per-dataset defaults for what they leave out."""
    task = Task(args.dataset)
    defaults = paper.TASK_DEFAULTS[task]
    words = [m.strip() for m in args.guidance.split(",") if m.strip()]
    allowed = [m.value for m in paper.GKT_MODES] + [ORACLE]
    if not words or not set(words) <= set(allowed):
        raise ValueError(f"--guidance takes {', '.join(allowed)}; got {args.guidance!r}")
    modes = tuple(GuidanceMode(m) for m in words if m != ORACLE)
    oracle = ORACLE in words
    if oracle:
        if args.runner == "live":
            raise ValueError(f"--guidance {ORACLE} is for offline evaluation only: no server serves it")
        check_oracle_task(task)
    baseline_words = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if not set(baseline_words) <= set(_BASELINES):
        raise ValueError(f"--baselines takes {', '.join(_BASELINES)}; got {args.baselines!r}")
    baselines = () if args.no_baselines else tuple(_BASELINES[b] for b in baseline_words)
    lengths = (
        tuple(int(n) for n in args.max_guidance_tokens.split(","))
        if args.max_guidance_tokens
        else (defaults.max_guidance_tokens,)
    )
    if any(n < 1 for n in lengths):
        raise ValueError(f"--guidance-tokens must be positive; got {args.max_guidance_tokens!r}")
    teacher, _, student = args.models.partition(",")
    if not teacher or not student:
        raise ValueError(f"--models takes TEACHER,STUDENT; got {args.models!r}")
    if args.runner == "live" and args.exemplars != ExemplarSet.CORRECTED.value:
        raise ValueError("live runs use the server's prompts, which use the corrected exemplars")
    live = args.runner == "live"
    if not live and args.student_batch_size > args.batch_size:
        raise ValueError("--student-batch-size must not exceed --batch-size: a teacher batch's students are "
                         "decoded together")  # fmt: skip
    teacher_temperature = 0.0 if args.greedy else paper.TEACHER_TEMPERATURE
    return EvalPlan(
        task=task,
        teacher=teacher.strip(),
        student=student.strip(),
        modes=modes,
        oracle=oracle,
        max_guidance_tokens=lengths,
        student_tokens=args.student_tokens or defaults.student_max_new_tokens,
        seed=args.seed,
        exemplar_set=ExemplarSet(args.exemplars),
        runner=args.runner,
        baselines=baselines,
        extra={"concurrency": args.concurrency} if live else _offline_extra(args),
        # A live teacher samples as its server is configured; the request cannot say.
        teacher_temperature=None if live else teacher_temperature,
        teacher_top_p=None if live else paper.TEACHER_TOP_P,
        student_temperature=0.0 if args.greedy else paper.STUDENT_TEMPERATURE,
    )


def _offline_extra(args: argparse.Namespace) -> dict[str, int]:
    """The offline runner's batch sizes, recorded for the reader (the student's only when not the paper's 1,
    so the plans of earlier runs, which did not record it, still match)."""
    extra = {"batch_size": args.batch_size}
    if args.student_batch_size > 1:
        extra["student_batch_size"] = args.student_batch_size
    return extra


def _live_runner(args: argparse.Namespace, plan: EvalPlan, *, api_key: str | None) -> Runner:
    from gkt.evaluation.live import LiveRunner

    live = LiveRunner(
        plan=plan,
        connection=connection_from_args(args, api_key=api_key),
        concurrency=args.concurrency,
        timeout_s=args.timeout,
    )
    if not live.reachable():
        live.close()
        raise ConnectionOptionError(
            f"cannot reach the gateway at {args.addr}: is the stack up? `make up`, or `--addr`"
        )
    return live


def _offline_runner(args: argparse.Namespace, plan: EvalPlan, *, cache_dir: Path) -> Runner:
    import torch

    from gkt.evaluation.offline import OfflineRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    return OfflineRunner(
        plan=plan,
        cache_dir=cache_dir,
        device=args.device,
        dtype=args.dtype,
        student_batch_size=args.student_batch_size,
    )
