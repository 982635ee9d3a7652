"""Templates from MLflow's prompt registry: resolved, sandbox-checked, copied into the model and
linked to it, served without the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.entities.model_registry import PromptVersion
from mlflow.models import Model
from mlflow.tracing.constant import SpanAttributeKey

from templated_llm import TemplateError, TemplateSecurityError, log_llm

TEMPLATE = "{% if prompt|length > 20 %}Long question.\n{% endif %}Q: {{ prompt }}\nA:"
GREEDY = {"temperature": 0.0, "max_tokens": 4}


@pytest.fixture(scope="module")
def prompt_name() -> str:
    mlflow.genai.register_prompt("brief-qa", "Q: {{ prompt }}")  # version 1, not the one aliased
    version = mlflow.genai.register_prompt("brief-qa", TEMPLATE)
    mlflow.genai.set_prompt_alias("brief-qa", "production", version.version)
    return "brief-qa"


@pytest.fixture(scope="module")
def logged(prompt_name, tiny_snapshot):
    return log_llm("mpt-instruct", snapshot=tiny_snapshot, name="from-registry",
                   template=f"prompts:/{prompt_name}@production")


def test_the_aliased_version_is_recorded_and_linked_to_the_model(logged):
    config = Model.load(logged.model_uri).flavors["python_function"]["config"]
    assert (config["template_name"], config["template_version"], config["template_uri"]) == (
        "brief-qa", "2", "prompts:/brief-qa/2")
    assert Model.load(logged.model_uri).prompts == ["prompts:/brief-qa/2"]
    linked = json.loads(mlflow.get_logged_model(logged.model_id).tags["mlflow.linkedPrompts"])
    assert linked == [{"name": "brief-qa", "version": "2"}]


def test_the_model_renders_the_registry_text_and_traces_its_version(logged):
    model = mlflow.pyfunc.load_model(logged.model_uri)
    renders = model.unwrap_python_model().render(["Hi", "What is the longest river on earth?"])
    assert renders == ["Q: Hi\nA:", "Long question.\nQ: What is the longest river on earth?\nA:"]
    model.predict(["Hi"], params=GREEDY)
    trace = mlflow.get_trace(mlflow.get_last_active_trace_id(thread_local=True), flush=True)
    root = next(span for span in trace.data.spans if span.parent_id is None)
    assert root.get_attribute("templated_llm.template") == "brief-qa"
    assert root.get_attribute("templated_llm.template_version") == "2"
    # Set as MLflow's load_prompt sets it (a JSON string), read back decoded.
    assert root.get_attribute(SpanAttributeKey.LINKED_PROMPTS) == [{"name": "brief-qa", "version": "2"}]


def test_serving_needs_no_registry(logged, tmp_path):
    local = mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "model"))
    code = f"""
import mlflow
model = mlflow.pyfunc.load_model({local!r})
print(model.unwrap_python_model().render(["Hi"])[0])
"""
    # A tracking URI with no registry behind it: nothing may need one.
    env = {**os.environ, "MLFLOW_TRACKING_URI": (tmp_path / "nothing").as_uri(), "TEMPLATED_LLM_TRACING": "false"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.endswith("Q: Hi\nA:\n")


@pytest.mark.parametrize(("template", "error", "message"), [
    ("Q: {{ prompt.__class__ }}", TemplateSecurityError, "reaches for the attribute '__class__'"),
    ("Q: {% include 'other.jinja' %}", TemplateSecurityError, "'include' tag"),
    ("Q: {{ prompt }", TemplateError, "line 1"),
    ([{"role": "user", "content": "{{ prompt }}"}], TemplateError, "is a chat prompt"),
    # Single braces are plain text in Jinja: every request would render the same prompt.
    ("Q: {question}\nA:", TemplateError, "never shows the user's text"),
])
def test_a_registry_prompt_is_checked_like_a_file_before_anything_is_logged(tiny_snapshot, template, error, message):
    name = f"bad-{abs(hash(str(template)))}"
    mlflow.genai.register_prompt(name, template)
    before = len(mlflow.search_logged_models(output_format="list"))
    with pytest.raises(error, match=message) as raised:
        log_llm("mpt-instruct", snapshot=tiny_snapshot, template=f"prompts:/{name}/1")
    assert f"prompts:/{name}/1" in str(raised.value)  # the prompt, not a staging file
    assert len(mlflow.search_logged_models(output_format="list")) == before


def test_a_missing_prompt_names_the_uri(tiny_snapshot):
    with pytest.raises(TemplateError, match="'prompts:/no-such-prompt@production' could not be loaded"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, template="prompts:/no-such-prompt@production")


def test_an_mlflow_without_jinja_prompts_is_refused_clearly(prompt_name, tiny_snapshot, monkeypatch):
    def format_without_jinja(self, allow_partial: bool = False, **kwargs: object) -> str:
        return self.template

    monkeypatch.setattr(PromptVersion, "format", format_without_jinja)
    with pytest.raises(TemplateError, match=rf"MLflow \({mlflow.__version__}\) cannot store Jinja prompts"):
        log_llm("mpt-instruct", snapshot=tiny_snapshot, template=f"prompts:/{prompt_name}/2")


def test_a_file_template_keeps_its_file_name_and_content_version(logged_model):
    config = Model.load(logged_model.model_uri).flavors["python_function"]["config"]
    assert config["template_name"] == "mpt-instruct.jinja"
    assert config["template_version"].startswith("sha256:") and config["template_uri"] is None
