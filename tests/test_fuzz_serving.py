"""Fuzzing ``/invocations`` of a real ``templated-llm serve`` process (MLflow's own scoring app,
as ``mlflow models serve`` runs it) with hypothesis-generated request bodies.

Every body must get an answer below 500, the server must answer a valid request afterwards,
and its memory must stay bounded. The figures are printed (run with ``-s``) and recorded in
docs/security.md.
"""

from __future__ import annotations

import json
import os
import sys

import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from local_server import free_port, running_server
from templated_llm import log_llm

pytestmark = pytest.mark.slow

CASES = 500
RSS_GROWTH_BOUND = 512 * 2**20  # generous: the model, caches and allocator slack stay far below
VALID = {"inputs": ["Name three rivers."], "params": {"temperature": 0.0, "max_tokens": 3}}


# pandas 3.0's DataFrame repr fails on text with a lone surrogate (its column widths go through
# an Arrow string array, which must be UTF-8); 3.1 does not. MLflow quotes the input DataFrame in
# the model's refusals, so under 3.0 a refused body holding one was answered 500. The server runs
# with that behaviour whatever pandas is installed.
PANDAS_30_REPR = """
import pandas

_repr = pandas.DataFrame.__repr__


def _repr_as_pandas_30(self):
    text = _repr(self)
    text.encode("utf-8")
    return text


pandas.DataFrame.__repr__ = _repr_as_pandas_30
"""


@pytest.fixture(scope="module")
def server(tiny_snapshot, tmp_path_factory):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name="fuzzed", max_rows_per_request=8)
    site = tmp_path_factory.mktemp("pandas-3.0-repr")
    (site / "sitecustomize.py").write_text(PANDAS_30_REPR)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    port = free_port()
    command = [sys.executable, "-m", "templated_llm.cli", "serve", info.model_uri, "--port", str(port)]
    with running_server(command, port, env={"PYTHONPATH": path}) as url:
        yield url, port


def _server_rss(port: int) -> int:
    """Resident memory of the server's process tree."""
    [root] = [p for p in psutil.Process(os.getpid()).children() if str(port) in p.cmdline()]
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def _post(url: str, body: bytes, content_type: str) -> requests.Response:
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": content_type},
                         timeout=120)


# --- what hypothesis sends --------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**40), 10**40),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["", "{{ prompt }}", "{% raw %}", "\x00", "\u202e", "\U0001f600", "\udcff",
                     "<|endoftext|>", "Name three rivers."]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
prompt_column = st.lists(st.one_of(st.text(max_size=40), scalars, json_values), max_size=10)
huge_values = st.one_of(
    st.integers(1, 200_000).map(lambda n: "x" * n),  # up to 200 kB of one prompt
    st.integers(1, 100).map(lambda n: ["hi"] * n),   # more rows than the model accepts
    st.just(10**400), st.just(-(10**400)), st.just(1e308),
)
inputs = st.one_of(
    prompt_column,
    st.dictionaries(st.sampled_from(["prompt", "text", "messages", ""]),
                    st.one_of(prompt_column, json_values, huge_values), max_size=2),
    json_values,
    huge_values,
)
max_tokens = st.one_of(st.integers(1, 3), st.integers(1, 3), st.integers(-5, 0),
                       st.integers(1025, 10**30), scalars, json_values)
params = st.fixed_dictionaries(
    {"max_tokens": max_tokens},  # present, mostly tiny, so valid bodies generate in milliseconds
    optional={name: st.one_of(scalars, json_values, st.floats(-5, 5)) for name in
              ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "unknown")},
)
documents = st.one_of(
    st.fixed_dictionaries({"inputs": inputs}, optional={"params": st.one_of(params, json_values)}),
    st.fixed_dictionaries({"dataframe_split": st.fixed_dictionaries(
        {"columns": st.one_of(st.just(["prompt"]), st.lists(st.text(max_size=8), max_size=3)),
         "data": st.lists(st.lists(st.one_of(scalars, json_values), max_size=3), max_size=5)},
    )}, optional={"params": params}),
    st.fixed_dictionaries({"dataframe_records": st.lists(
        st.dictionaries(st.sampled_from(["prompt", "x"]), st.one_of(scalars, json_values), max_size=2),
        max_size=5)}, optional={"params": params}),
    st.fixed_dictionaries({"instances": inputs}, optional={"params": params}),
    st.dictionaries(st.text(max_size=12), json_values, max_size=4),  # missing or unknown fields
    json_values,
)


def _encode(document: object) -> bytes:
    return json.dumps(document, allow_nan=False).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    documents.map(lambda d: (_encode(d), "application/json")),
    documents.map(lambda d: (_encode(d), "application/json; charset=utf-8")),
    # Truncated JSON, arbitrary bytes (invalid UTF-8 included), and other content types.
    st.tuples(documents.map(_encode), st.integers(0, 50)).map(
        lambda t: (t[0][: max(len(t[0]) - t[1], 0)], "application/json")),
    st.tuples(st.binary(max_size=200), st.sampled_from(
        ["application/json", "text/csv", "application/vnd.apache.parquet", "text/plain",
         "application/json; charset=latin-1", "application/json; boundary=x"])),
    st.text(max_size=200).map(lambda t: (f"prompt\n{t}".encode("utf-8", "surrogatepass"), "text/csv")),
)


def test_fuzzed_bodies_never_get_a_5xx_and_the_server_survives(server):
    url, port = server
    assert _post(url, _encode(VALID), "application/json").status_code == 200  # warm up
    rss_before = _server_rss(port)
    tried, failures, statuses = [], [], {}

    @settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies)
    def send(body: tuple[bytes, str]) -> None:
        data, content_type = body
        response = _post(url, data, content_type)
        tried.append(data)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append((response.status_code, content_type, data[:300], response.text[:300]))

    send()
    after = _post(url, _encode(VALID), "application/json")
    rss_after = _server_rss(port)
    print(f"\nfuzz: {len(tried)} bodies tried, {len(failures)} answered 5xx, statuses "
          f"{dict(sorted(statuses.items()))}; server RSS before {rss_before / 2**20:.0f} MiB, "
          f"after {rss_after / 2**20:.0f} MiB")
    assert len(tried) >= CASES
    assert failures == []
    assert after.status_code == 200 and len(after.json()["predictions"]) == 1
    assert rss_after - rss_before < RSS_GROWTH_BOUND


def test_a_refused_body_mlflow_cannot_quote_is_still_a_400(server):
    url, _ = server
    # One of the bodies the fuzzing answered 500 on pandas 3.0.
    body = {"dataframe_records": [{"prompt": 623633705695}, {"x": 22062, "prompt": "\udcff"}],
            "params": {"max_tokens": None}}
    response = _post(url, _encode(body), "application/json")
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["message"].startswith("input columns ['x'] are neither 'prompt', 'messages' nor a param")
    assert _post(url, _encode(VALID), "application/json").status_code == 200


# Two bodies MLflow's scoring server fails on with a 500, before the model is called (see
# docs/security.md); templated-llm serve answers them itself.
MLFLOW_5XX = {
    "no Content-Type header": (b'{"inputs": ["hi"]}', None, 415),
    "JSON nested deeper than Python's recursion limit": (b"[" * 100_000 + b"]" * 100_000,
                                                         "application/json", 400),
}


@pytest.mark.parametrize("case", MLFLOW_5XX)
def test_bodies_mlflow_itself_fails_on_are_client_errors_here(server, case):
    url, _ = server
    data, content_type, status = MLFLOW_5XX[case]
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = requests.post(f"{url}/invocations", data=data, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    assert _post(url, _encode(VALID), "application/json").status_code == 200
