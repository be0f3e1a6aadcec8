"""Evaluation: MedMNIST-compatible metrics with bootstrap CIs, and report writing."""
from __future__ import annotations

from anymc3d.evaluation.metrics import TASK_TYPES, bootstrap_ci, compute_metrics, prepare_inputs
from anymc3d.evaluation.report import write_report

__all__ = ["TASK_TYPES", "bootstrap_ci", "compute_metrics", "prepare_inputs", "write_report"]
