"""Batch inference with mlflow.pyfunc.spark_udf on local Spark."""

from __future__ import annotations

import os
import shutil
import sys

import mlflow
import pytest

pyspark = pytest.importorskip("pyspark")
pytestmark = [
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas"),
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime"),
]

PROMPTS = ["Name three rivers.", "What is machine learning?", "Hi", "Explain caches."]
PARAMS = {"temperature": 0.0, "max_tokens": 5}


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    # Spark's Python workers must run this interpreter, which has the model's requirements.
    os.environ["PYSPARK_PYTHON"] = sys.executable

    session = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    yield session
    session.stop()


def test_spark_udf_returns_one_completion_per_row_with_params(spark, logged_model, loaded_model):
    complete = mlflow.pyfunc.spark_udf(
        spark, logged_model.model_uri, result_type="string", env_manager="local", params=PARAMS
    )
    prompts = spark.createDataFrame([(p,) for p in PROMPTS], ["prompt"]).repartition(2)
    rows = prompts.withColumn("completion", complete("prompt")).collect()
    got = {row["prompt"]: row["completion"] for row in rows}
    expected = loaded_model.predict(PROMPTS, params=PARAMS)["candidates"].tolist()
    assert got == dict(zip(PROMPTS, expected, strict=True))


def test_spark_udf_with_its_default_result_type_and_a_row_s_own_params(spark, logged_model, loaded_model):
    from pyspark.sql.functions import struct

    prompts = spark.createDataFrame([(p, 2 + i) for i, p in enumerate(PROMPTS)], ["prompt", "max_tokens"])
    # No result_type: MLflow derives it from the logged output schema.
    complete = mlflow.pyfunc.spark_udf(spark, logged_model.model_uri, env_manager="local", params=PARAMS)
    got = {row["prompt"]: row["completion"] for row in prompts.withColumn("completion", complete("prompt")).collect()}
    assert got == dict(zip(PROMPTS, loaded_model.predict(PROMPTS, params=PARAMS)["candidates"], strict=True))
    # A struct's fields named as params give each row its own, here its max_tokens; usage on request.
    usage = mlflow.pyfunc.spark_udf(
        spark, logged_model.model_uri, env_manager="local", params={**PARAMS, "return_usage": True},
        result_type="candidates string, completion_tokens long, finish_reason string")
    rows = prompts.withColumn("out", usage(struct("prompt", "max_tokens"))).collect()
    assert {row["prompt"]: row["out"]["completion_tokens"] for row in rows} == {
        p: 2 + i for i, p in enumerate(PROMPTS)}
