"""The pipeline app on top of the `qualiclip` library: command line, stages, tracking, promotion.

    cli            the ``qualiclip`` command (argparse lives here only)
    stages         each DVC stage as a function: params file + paths in, result out
    paths          where the stages read and write, read from dvc.yaml
    tracking_config  which tracker a stage logs to; what the train stage registered
    execution      which pipeline execution a stage run belongs to
    lineage        what each stage consumes, as dataset references with digests
    tracking_mlflow, serving   the MLflow tracker and the pyfunc model it logs (import mlflow)
    pyfunc_model   the model code MLflow logs and runs to load the served model
    promotion      the quality gate; move the registry's champion alias to a better model
    report         the markdown report of a retraining run
    score_cli, explain_cli     ``qualiclip score`` / ``qualiclip explain``

The library below never imports this package (an import-linter contract in pyproject.toml,
checked by tests/test_architecture.py). Prefect flows (``flows/``) sit on top of it.
"""
