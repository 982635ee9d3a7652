from __future__ import annotations

from pathlib import Path

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


def test_a_draft_in_the_working_directory_never_replaces_a_plugins_template(tmp_path, monkeypatch):
    from templated_llm.plugins.manager import get_model_spec
    from templated_llm.runtime.loading import template_path
    from templated_llm.runtime.templates import TEMPLATES_DIR

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mpt-instruct.jinja").write_text("MY DRAFT {{ prompt }}")
    shipped = TEMPLATES_DIR / "mpt-instruct.jinja"
    assert template_path(get_model_spec("mpt-instruct")) == shipped
    # Asked for by that bare name, it is ambiguous; a path says which.
    with pytest.raises(TemplateError, match="both a shipped template and a different file"):
        template_path(get_model_spec("mpt-instruct"), "mpt-instruct.jinja")
    assert template_path(get_model_spec("mpt-instruct"), "./mpt-instruct.jinja").read_text() == "MY DRAFT {{ prompt }}"
    # A Path names a file, as the refusal says: Path("./x") is Path("x"), which was refused again.
    draft = template_path(get_model_spec("mpt-instruct"), Path("./mpt-instruct.jinja"))
    assert draft.read_text() == "MY DRAFT {{ prompt }}"
    (tmp_path / "mpt-instruct.jinja").write_bytes(shipped.read_bytes())  # the same file: no doubt
    assert template_path(get_model_spec("mpt-instruct"), "mpt-instruct.jinja") == shipped
