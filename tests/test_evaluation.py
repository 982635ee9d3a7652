"""``mlflow.genai.evaluate`` on a logged TemplatedLLM through ``predict_fn``, offline: built-in
scorers that need no judge model, rows predicted from many threads."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
from mlflow.genai.scorers import RegexMatch, ResponseLength

from templated_llm import log_llm
from templated_llm.evaluation import predict_fn

QUESTIONS = ["What is machine learning?", "Name three rivers.", "Explain attention.", "Hi",
             "What is a token?", "Describe a river."]
GREEDY = {"temperature": 0.0, "max_tokens": 6}


@pytest.fixture(scope="module")
def predict(logged_model):
    return predict_fn(logged_model.model_uri, params=GREEDY)


def test_concurrent_calls_answer_as_calls_one_at_a_time(predict, loaded_model):
    alone = loaded_model.predict(QUESTIONS, params=GREEDY)["candidates"].tolist()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: predict(prompt=q), QUESTIONS))
    assert together == alone


def test_evaluate_scores_every_row_with_judge_free_scorers(predict, loaded_model):
    data = [{"inputs": {"prompt": q}} for q in QUESTIONS]
    result = mlflow.genai.evaluate(
        data=data, predict_fn=predict,
        scorers=[ResponseLength(max_length=200), RegexMatch(pattern=r"\S")],
    )
    assert result.metrics["response_length/mean"] == 1.0
    rows = result.result_df
    assert len(rows) == len(QUESTIONS)
    expected = dict(zip(QUESTIONS, loaded_model.predict(QUESTIONS, params=GREEDY)["candidates"]))
    for _, row in rows.iterrows():
        # Each row's trace: the call with the row's inputs, over the model's own spans.
        trace = mlflow.get_trace(row["trace_id"])
        assert [span.name for span in trace.data.spans][:2] == ["predict_fn", "mpt-instruct"]
        assert row["response"] == expected[row["request"]["prompt"]]
        assert trace.info.token_usage["output_tokens"] > 0


@pytest.mark.parametrize(("model", "architecture", "task", "row"), [
    ("llama2-chat", "llama", "llm/v1/chat",
     {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}),
    ("mpt-instruct", "mpt", "llm/v1/completions", {"prompt": "Name three rivers."}),
])
def test_a_task_model_answers_the_call_as_the_default_schema_does(tiny_model, model, architecture, task, row):
    snapshot = tiny_model(architecture)
    answers = [predict_fn(log_llm(model, snapshot=snapshot, task=t).model_uri, GREEDY)(**row)
               for t in (None, task)]
    assert answers[0] == answers[1]


def test_a_row_needs_prompt_or_messages(predict):
    with pytest.raises(TypeError, match="prompt=.*received neither"):
        predict(question="Hi")
    with pytest.raises(TypeError, match="prompt=.*received both"):
        predict(prompt="Hi", messages=[{"role": "user", "content": "Hi"}])


def test_a_name_the_model_does_not_take_is_refused_not_dropped(logged_model, predict):
    # MLflow drops a param its schema lacks with a warning: the evaluation would run at 256 tokens.
    with pytest.raises(TypeError, match=r"params \['max_token'\] are not params of this model"):
        predict_fn(logged_model.model_uri, params={"temperature": 0.0, "max_token": 2})
    with pytest.raises(TypeError, match=r"the row's inputs \['sytem'\] are not params"):
        predict(prompt="Hi", sytem="Be brief.")


def test_the_trace_holds_the_rows_inputs_and_without_content_none_of_their_text(tiny_snapshot, predict):
    def last_predict_fn_span():
        trace = mlflow.get_trace(mlflow.get_last_active_trace_id(thread_local=True), flush=True)
        return next(s for s in trace.data.spans if s.name == "predict_fn"), json.dumps(trace.to_dict())

    answer = predict(prompt="Tell me okapi-secret-7")
    span, _ = last_predict_fn_span()
    assert (span.inputs, span.outputs) == ({"prompt": "Tell me okapi-secret-7"}, answer)
    quiet = predict_fn(log_llm("mpt-instruct", snapshot=tiny_snapshot, name="quiet", trace_content=False).model_uri,
                       params=GREEDY)
    answer = quiet(prompt="Tell me okapi-secret-7")
    span, text = last_predict_fn_span()
    assert span.inputs == {"inputs": ["prompt"]} and span.outputs == {"characters": len(answer)}
    assert "okapi-secret-7" not in text and (len(answer) < 4 or answer not in text)
