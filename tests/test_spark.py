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
