from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from templated_llm import TemplateError
from templated_llm.runtime.templates import PromptTemplate, available_templates, find_template

MPT = PromptTemplate.from_file(find_template("mpt-instruct.jinja"))

jinja_heavy_text = st.lists(
    st.one_of(
        st.sampled_from(["{{", "}}", "{%", "%}", "{#", "#}", "'", '"', "\\", "{{ 7*7 }}",
                         "{% for x in range(9) %}x{% endfor %}", "{{ prompt }}", "\n", "\u00e9",
                         "\u4e2d\u6587", "\U0001f600", "\u202e", "\x00"]),
        st.text(),
    ),
    max_size=12,
).map("".join)


@given(jinja_heavy_text)
def test_user_text_appears_verbatim_and_is_never_evaluated(text: str) -> None:
    rendered = MPT.render(text)
    assert text in rendered
    assert rendered == MPT.render("\0SENTINEL\0").replace("\0SENTINEL\0", text)


def test_mpt_template_wraps_the_instruction() -> None:
    rendered = MPT.render("{{ 7*7 }}")
    assert "### Instruction:\n{{ 7*7 }}\n### Response:\n" in rendered
    assert "49" not in rendered
    assert rendered.endswith("### Response:\n")


def test_undefined_variables_fail_instead_of_rendering_empty() -> None:
    with pytest.raises(TemplateError, match="system"):
        PromptTemplate("{{ system }} {{ prompt }}").render("hi")


def test_sandbox_blocks_attribute_escapes() -> None:
    with pytest.raises(TemplateError, match="sandbox"):
        PromptTemplate("{{ prompt.__class__.__mro__[1].__subclasses__() }}")


def test_syntax_errors_name_the_line() -> None:
    with pytest.raises(TemplateError, match="line 2"):
        PromptTemplate("ok\n{% if %}", name="broken.jinja")


def test_unknown_template_lists_the_shipped_ones() -> None:
    assert "mpt-instruct.jinja" in available_templates()
    with pytest.raises(TemplateError, match="mpt-instruct.jinja"):
        find_template("nope.jinja")
