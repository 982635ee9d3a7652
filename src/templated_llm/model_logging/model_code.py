"""The code of every logged TemplatedLLM: MLflow runs this file to build the model at load time.

Logging the model as code (MLflow's "models from code") stores this file instead of a pickled
object, so loading depends on no pickle format and runs nothing but this.
"""

import mlflow.models

from templated_llm.runtime.pyfunc import TemplatedLLM

mlflow.models.set_model(TemplatedLLM())
