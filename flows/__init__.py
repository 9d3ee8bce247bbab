"""Prefect flows that compose the qualiclip library; the DAG itself lives in dvc.yaml."""
