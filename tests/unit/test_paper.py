"""The paper's settings live in `gkt.paper`; the gateway, the jobs, the evaluation, the teacher's settings,
the `gkt` command and the README all say the same."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gkt import paper
from gkt.client import DEFAULT_GATEWAY_ADDR
from gkt.evaluation.datasets import DATASETS
from gkt.jobs import GuidanceSpec, Job, JobKind, SamplingParams
from gkt.paper import Task
from gkt.prompts import exemplars
from gkt.v1 import guidance_pb2 as pb
from gkt_tools import ask
from gkt_tools.evaluation import add_arguments, build_plan
from services.gateway.convert import to_job
from services.gateway.settings import GatewaySettings
from services.teacher.settings import TeacherSettings

README = (Path(__file__).parents[2] / "README.md").read_text()
TASK_ORDER = (Task.GSM8K, Task.CSQA, Task.AQUA, Task.FREEFORM)  # as the README lists them


@pytest.mark.parametrize("task", list(Task))
def test_the_few_shot_count_is_the_prompts_own(task: Task) -> None:
    expected = paper.TASK_DEFAULTS[task].few_shot
    if task is Task.FREEFORM:
        assert expected == 0
    else:
        assert len(exemplars(task=task)) == expected


@pytest.mark.parametrize("task", list(Task))
def test_the_gateway_fills_unset_fields_with_the_papers_settings(task: Task) -> None:
    defaults = paper.TASK_DEFAULTS[task]
    request = pb.GenerateRequest(query="How many?", task=pb.Task.Value(f"TASK_{task.value.upper()}"))
    job = to_job(request, kind=JobKind.GENERATE, settings=GatewaySettings(), timeout_s=10.0)
    assert job.guidance.max_guidance_tokens == defaults.max_guidance_tokens
    assert job.sampling.max_new_tokens == defaults.student_max_new_tokens
    assert (job.sampling.temperature, job.sampling.top_p) == (paper.STUDENT_TEMPERATURE, paper.STUDENT_TOP_P)


def test_a_job_built_without_settings_is_a_free_form_question_with_its_defaults() -> None:
    job = Job(query="q")
    defaults = paper.TASK_DEFAULTS[Task.FREEFORM]
    assert job.task is Task.FREEFORM
    assert job.guidance == GuidanceSpec(max_guidance_tokens=defaults.max_guidance_tokens)
    assert job.sampling == SamplingParams(
        temperature=paper.STUDENT_TEMPERATURE,
        top_p=paper.STUDENT_TOP_P,
        max_new_tokens=defaults.student_max_new_tokens,
    )


@pytest.mark.parametrize("task", list(DATASETS))
def test_the_evaluation_plans_the_papers_settings(task: Task) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, default_addr=DEFAULT_GATEWAY_ADDR)
    plan = build_plan(parser.parse_args(["--dataset", task.value]))
    defaults = paper.TASK_DEFAULTS[task]
    assert plan.max_guidance_tokens == (defaults.max_guidance_tokens,)
    assert plan.student_tokens == defaults.student_max_new_tokens
    assert (plan.teacher_temperature, plan.teacher_top_p) == (paper.TEACHER_TEMPERATURE, paper.TEACHER_TOP_P)
    assert (plan.student_temperature, plan.student_top_p) == (paper.STUDENT_TEMPERATURE, paper.STUDENT_TOP_P)


def test_the_teacher_samples_as_the_paper_by_default() -> None:
    fields = TeacherSettings.model_fields
    assert fields["teacher_temperature"].default == paper.TEACHER_TEMPERATURE
    assert fields["teacher_top_p"].default == paper.TEACHER_TOP_P


def test_the_command_offers_every_task_and_mode() -> None:
    assert set(ask.TASKS) == {t.value for t in Task}
    assert set(ask.MODES) == {m.value for m in paper.GuidanceMode}


def test_the_readme_states_the_papers_settings() -> None:
    match = re.search(r"guidance ([\d/]+) tokens and student ([\d/]+)\s+tokens", README)
    assert match is not None
    guidance, student = (tuple(int(n) for n in group.split("/")) for group in match.groups())
    assert guidance == tuple(paper.TASK_DEFAULTS[t].max_guidance_tokens for t in TASK_ORDER)
    assert student == tuple(paper.TASK_DEFAULTS[t].student_max_new_tokens for t in TASK_ORDER)
    assert f"student T={paper.STUDENT_TEMPERATURE:g}, top-p {paper.STUDENT_TOP_P:g}" in README


def test_the_api_documents_the_papers_settings() -> None:
    proto = (Path(__file__).parents[2] / "protos" / "gkt" / "v1" / "guidance.proto").read_text()
    text = re.sub(r"\s+", " ", " ".join(line.strip().removeprefix("//") for line in proto.splitlines()))
    guidance = ", ".join(
        f"{t.value.upper()} {paper.TASK_DEFAULTS[t].max_guidance_tokens}" for t in TASK_ORDER
    )
    student = ", ".join(
        f"{t.value.upper()} {paper.TASK_DEFAULTS[t].student_max_new_tokens}" for t in TASK_ORDER
    )
    # the proto spells the datasets as the paper does
    spelled = {"AQUA": "AQuA"}
    for name, proper in spelled.items():
        guidance, student = guidance.replace(name, proper), student.replace(name, proper)
    assert guidance.replace(", FREEFORM", "; FREEFORM") in text
    assert f"max_new_tokens {student}" in text
    assert f"temperature {paper.STUDENT_TEMPERATURE:g}, top_p {paper.STUDENT_TOP_P:g}" in text
