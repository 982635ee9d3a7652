from __future__ import annotations

import pytest

from templated_llm import TemplateError
from templated_llm.runtime.templates import PromptTemplate, available_templates, find_template

MPT = PromptTemplate.from_file(find_template("mpt-instruct.jinja"))


def test_mpt_template_wraps_the_instruction() -> None:
    rendered = MPT.render("{{ 7*7 }}")
    assert "### Instruction:\n{{ 7*7 }}\n### Response:\n" in rendered
    assert "49" not in rendered
    assert rendered.endswith("### Response:\n")


def test_undefined_variables_fail_instead_of_rendering_empty() -> None:
    with pytest.raises(TemplateError, match="system"):
        PromptTemplate("{{ system }} {{ prompt }}").render("hi")


def test_syntax_errors_name_the_line() -> None:
    with pytest.raises(TemplateError, match="line 2"):
        PromptTemplate("ok\n{% if %}", name="broken.jinja")


def test_unknown_template_lists_the_shipped_ones() -> None:
    assert "mpt-instruct.jinja" in available_templates()
    with pytest.raises(TemplateError, match="mpt-instruct.jinja"):
        find_template("nope.jinja")
