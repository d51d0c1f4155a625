"""The README documents every setting the services read; the inference-server pages, their servers'."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from gkt.config import variable_name
from services.gateway.settings import GatewaySettings
from services.student.settings import StudentServerSettings, StudentSettings
from services.teacher.settings import TeacherServerSettings, TeacherSettings

README = (Path(__file__).parents[2] / "README.md").read_text()


@pytest.mark.parametrize("settings_class", [GatewaySettings, TeacherSettings, StudentSettings])
def test_every_setting_is_in_the_readme(settings_class: type[BaseSettings]) -> None:
    variables = [variable_name(settings_class, name) for name in settings_class.model_fields]
    missing = [variable for variable in variables if f"`{variable}`" not in README]
    assert not missing


@pytest.mark.parametrize("settings_class", [GatewaySettings, TeacherSettings, StudentSettings])
def test_every_setting_has_a_description(settings_class: type[BaseSettings]) -> None:
    assert all(field.description for field in settings_class.model_fields.values())


@pytest.mark.parametrize(
    ("settings_class", "page"),
    [(TeacherServerSettings, "teacher-backends.md"), (StudentServerSettings, "inference-servers.md")],
)
def test_every_inference_server_setting_is_on_its_page(settings_class: type[BaseSettings], page: str) -> None:
    text = (Path(__file__).parents[2] / "docs" / page).read_text()
    prefix = str(settings_class.model_config.get("env_prefix"))
    missing = [
        f"{prefix}{name.upper()}"
        for name in settings_class.model_fields
        if f"`{prefix}{name.upper()}`" not in text
    ]
    assert not missing
    assert all(field.description for field in settings_class.model_fields.values())
