"""The shipped model plugins, each on a small random model of its architecture: the exact
prompts they render, greedy output equal to plain transformers on that prompt, chat input."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import mlflow
import pytest
import transformers
from mlflow.exceptions import MlflowException

from templated_llm import ModelSpec, TemplateError, log_llm
from templated_llm.devtools.tiny import END_OF_TEXT, ZEPHYR_CHAT_TEMPLATE
from templated_llm.runtime.loading import render_prompt

DOLLY_SPECIAL_TOKENS = ("### End", "### Instruction:", "### Response:")
# plugin -> (distribution, architecture of its models, snapshot options)
PLUGINS = {
    "llama2-chat": ("templated-llm-llama2", "llama", {}),
    "mistral-instruct": ("templated-llm-mistral", "mistral", {}),
    "dolly-v2": ("templated-llm-dolly", "gpt_neox", {"extra_special_tokens": DOLLY_SPECIAL_TOKENS}),
    # Zephyr: a Mistral fine-tune whose tokenizer carries its chat template.
    "hf-chat": ("templated-llm-hf-chat", "mistral", {"chat_template": ZEPHYR_CHAT_TEMPLATE}),
}
DOLLY_INTRO = ("Below is an instruction that describes a task. Write a response that "
               "appropriately completes the request.\n\n")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a river."}]

# What each model must see, written out by hand from each family's published format.
PROMPT_RENDERED = {
    "llama2-chat": "[INST] Name three rivers. [/INST]",
    "mistral-instruct": "[INST] Name three rivers. [/INST]",
    "dolly-v2": DOLLY_INTRO + "### Instruction:\nName three rivers.\n\n### Response:\n",
    "hf-chat": "<|user|>\nName three rivers.</s>\n<|assistant|>\n",
}
CHAT_RENDERED = {
    "llama2-chat": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Name a river. [/INST]",
    # Mistral's cookbook (tokenizer v1, v0.1/v0.2): an answer is encoded on its own, so it starts
    # with a word-initial token, as after a space.
    "mistral-instruct": "[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] Name a river. [/INST]",
    "hf-chat": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n"
               "<|user|>\nName a river.</s>\n<|assistant|>\n",
}
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module", params=sorted(PLUGINS))
def plugin(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def snapshot(plugin, tiny_model) -> Path:
    _, architecture, options = PLUGINS[plugin]
    return tiny_model(architecture, **options)


@pytest.fixture(scope="module")
def model(plugin, snapshot):
    info = log_llm(plugin, snapshot=snapshot, name=plugin)
    return mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"})  # as the oracle runs


def _plain_generate(snapshot: Path, text: str, add_special_tokens: bool) -> str:
    """The oracle: transformers alone, on the prompt text written out by hand."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot)
    model = transformers.AutoModelForCausalLM.from_pretrained(snapshot).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
    output = model.generate(ids, max_new_tokens=GREEDY["max_tokens"], do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_each_plugin_is_its_own_installed_distribution(plugin) -> None:
    distribution = importlib.metadata.distribution(PLUGINS[plugin][0])
    assert [(ep.group, ep.name) for ep in distribution.entry_points] == [("templated_llm", plugin)]


def test_the_prompt_is_rendered_in_the_family_format(plugin, model) -> None:
    assert model.unwrap_python_model().render(["Name three rivers."]) == [PROMPT_RENDERED[plugin]]


def test_greedy_predict_equals_transformers_on_the_hand_written_prompt(plugin, model, snapshot) -> None:
    expected = _plain_generate(snapshot, PROMPT_RENDERED[plugin], add_special_tokens=plugin != "hf-chat")
    assert model.predict(["Name three rivers."], params=GREEDY)["candidates"].tolist() == [expected]


@pytest.mark.parametrize("plugin", sorted(CHAT_RENDERED), indirect=True)
def test_chat_models_render_messages_and_the_system_prompt(plugin, model, snapshot) -> None:
    python_model = model.unwrap_python_model()
    assert python_model.render([CHAT]) == [CHAT_RENDERED[plugin]]
    # The system prompt as a param renders as a leading system message does.
    assert python_model.render([CHAT[1:]], {"system": "Be brief."}) == [CHAT_RENDERED[plugin]]
    expected = _plain_generate(snapshot, CHAT_RENDERED[plugin], add_special_tokens=plugin != "hf-chat")
    out = model.predict({"messages": [CHAT, CHAT]}, params=GREEDY)
    assert out["candidates"].tolist() == [expected, expected]


# A system message sent empty keeps its block, as each family's official template renders it.
EMPTY_SYSTEM_RENDERED = {
    "llama2-chat": "[INST] <<SYS>>\n\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Name a river. [/INST]",
    "mistral-instruct": "[INST] \n\nHi [/INST] Hello.</s>[INST] Name a river. [/INST]",
    "hf-chat": "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n"
               "<|user|>\nName a river.</s>\n<|assistant|>\n",
}


@pytest.mark.parametrize("plugin", sorted(EMPTY_SYSTEM_RENDERED), indirect=True)
def test_an_empty_system_message_keeps_its_block_and_no_system_message_has_none(plugin, model) -> None:
    python_model = model.unwrap_python_model()
    empty_system = [{"role": "system", "content": ""}, *CHAT[1:]]
    assert python_model.render([empty_system]) == [EMPTY_SYSTEM_RENDERED[plugin]]
    # No system message, or the system param left at its default "": no block at all.
    without = CHAT_RENDERED[plugin].replace("<<SYS>>\nBe brief.\n<</SYS>>\n\n", "").replace(
        "Be brief.\n\n", "").replace("<|system|>\nBe brief.</s>\n", "")
    assert python_model.render([CHAT[1:]]) == python_model.render([CHAT[1:]], {"system": ""}) == [without]
    assert "Be brief" not in without and "SYS" not in without and "system" not in without


# Gemma's chat template has no system role: it refuses a system message outright.
NO_SYSTEM_ROLE_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_template_without_a_system_role_takes_an_empty_system_message_and_refuses_a_real_one(tiny_model):
    snapshot = tiny_model("mistral", chat_template=NO_SYSTEM_ROLE_TEMPLATE)
    info = log_llm("hf-chat", snapshot=snapshot, name="no-system-role")
    python_model = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"}).unwrap_python_model()
    alone = python_model.render([CHAT[1:2]])
    assert alone == ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"]
    assert python_model.render([[{"role": "system", "content": ""}, *CHAT[1:2]]]) == alone
    with pytest.raises(MlflowException, match="rejected the conversation: System role not supported"):
        python_model.render([CHAT[:2]])


def test_the_tokenizer_adds_llamas_bos_once(plugin, model) -> None:
    python_model = model.unwrap_python_model()
    text = python_model.render(["Hi"])[0]
    ids = python_model.tokenizer(text, add_special_tokens=python_model.tokens.add_special_tokens).input_ids
    bos = python_model.tokenizer.bos_token_id
    expected = 1 if plugin in ("llama2-chat", "mistral-instruct") else 0
    assert ids.count(bos) == expected and (expected == 0 or ids[0] == bos)


def test_dolly_renders_its_context_input_and_ends_at_its_end_key(tiny_model) -> None:
    snapshot = tiny_model("gpt_neox", extra_special_tokens=DOLLY_SPECIAL_TOKENS)
    model = mlflow.pyfunc.load_model(log_llm("dolly-v2", snapshot=snapshot, name="dolly").model_uri)
    python_model = model.unwrap_python_model()
    [rendered] = python_model.render(["Name three rivers."], {"context": "The Nile is long."})
    assert rendered == (DOLLY_INTRO + "### Instruction:\nName three rivers.\n\n"
                        "Input:\nThe Nile is long.\n\n### Response:\n")
    end = python_model.tokenizer.convert_tokens_to_ids("### End")
    assert end in python_model.model.generation_config.eos_token_id
    with pytest.raises(MlflowException, match="does not take chat 'messages'"):
        model.predict({"messages": [CHAT[1:2]]})


@pytest.mark.parametrize("engine", [True, False])
def test_dolly_strips_its_answer_as_databricks_pipeline_does(tiny_model, engine) -> None:
    snapshot = tiny_model("gpt_neox", extra_special_tokens=DOLLY_SPECIAL_TOKENS)
    raw = _plain_generate(snapshot, DOLLY_INTRO + "### Instruction:\nWhy?\n\n### Response:\n",
                          add_special_tokens=True)
    assert raw != raw.strip()  # this prompt's answer opens with a space: stripping shows
    info = log_llm("dolly-v2", snapshot=snapshot, name="dolly-strip")
    model = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu", "engine": engine})
    out = model.predict(["Why?"], params={**GREEDY, "return_usage": True})
    assert out["candidates"].tolist() == [raw.strip()]
    assert out["completion_tokens"].tolist() == [GREEDY["max_tokens"]]  # tokens counted as generated
    chunks = list(model.predict_stream("Why?", params=GREEDY))
    assert "".join(chunks) == raw.strip() and all(chunks)
    [completion] = list(model.unwrap_python_model().generate_stream("Why?", GREEDY, text=False))
    assert completion.text == raw.strip()


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
def test_hf_chat_serves_qwen_as_transformers_generates(tiny_model, architecture) -> None:
    # Qwen runs on the engine through transformers' own forward (its tokenizer pads with eos).
    snapshot = tiny_model(architecture, chat_template=ZEPHYR_CHAT_TEMPLATE)
    info = log_llm("hf-chat", snapshot=snapshot, name=f"hf-chat-{architecture}")
    model = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"})
    assert model.unwrap_python_model().engine is not None
    rendered = CHAT_RENDERED["hf-chat"].replace("</s>", END_OF_TEXT)  # Zephyr's format, Qwen's eos
    assert model.unwrap_python_model().render([CHAT]) == [rendered]
    expected = _plain_generate(snapshot, rendered, add_special_tokens=False)
    assert model.predict({"messages": [CHAT[1:], CHAT[1:]]}, params={**GREEDY, "system": "Be brief."}
                         )["candidates"].tolist() == [expected, expected]


def test_hf_chat_refuses_at_log_time_a_tokenizer_without_a_chat_template(tiny_model) -> None:
    snapshot = tiny_model("mistral")
    with pytest.raises(TemplateError) as caught:
        log_llm("hf-chat", snapshot=snapshot, name="no-chat-template")
    message = str(caught.value)
    assert f"the tokenizer of snapshot {snapshot} has no chat_template" in message
    assert "a plugin made for this model" in message and "chat_template.jinja" in message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"template_variables": {"prompt": ""}}, "template variable 'prompt'"),
        ({"template_variables": {"not an identifier": ""}}, "Python identifier"),
        ({"tokenizer_chat_template": True}, "set chat=True too"),
        ({"chat": True, "chat_as_instruction": True}, "set chat=False"),
    ],
)
def test_a_spec_refuses_variables_the_core_owns_and_chat_templates_without_chat(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec(name="m", repo_id="o/m", template="t.jinja", **fields)


def test_llama2_chat_strips_each_turn_as_metas_chat_completion_does() -> None:
    # f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ", the
    # system block joined to the first user turn before the strip (llama/generation.py).
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi \n"},
                    {"role": "assistant", "content": " Hello.\n"}, {"role": "user", "content": "\tName a river.  "}]
    assert render_prompt("llama2-chat", conversation) == \
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n  Hi [/INST] Hello. </s><s>[INST] Name a river. [/INST]"
    assert render_prompt("llama2-chat", " Name three rivers.\n") == "[INST] Name three rivers. [/INST]"
