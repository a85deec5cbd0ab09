"""Evaluation: the conversation runner, probing, the drift protocol, reports and comparisons; runner.py is what
evaluate.py runs."""
