"""Evaluation: benchmark readers (benchmarks.py), scores (metrics.py; replies are read and checked
by data/answers.py), `evaluate` in generation and perplexity modes (runner.py, ppl.py), reports
(report.py) and the `vlmkit eval` command (cli.py). See docs/evaluation.md."""
