"""hdkd: hidden-state knowledge distillation from a Flan-T5 teacher to a Flan-T5 student, tracked in MLflow."""

__version__ = "0.1.0"
