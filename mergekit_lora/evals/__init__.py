"""Evaluation: fidelity (no model) and task quality (with a model), and benchmarks."""
