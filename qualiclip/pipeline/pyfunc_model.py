"""The model code MLflow logs and runs to load the served model ("models from code").

`serving.log_pyfunc` passes this file as ``python_model``: MLflow copies it into the model and
executes it on load, instead of unpickling an object. Nothing else imports it.
"""

from mlflow.models import set_model

from qualiclip.pipeline.serving import QualiCLIPPyfunc

set_model(QualiCLIPPyfunc())
