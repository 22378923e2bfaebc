"""Evaluation: benchmark readers (benchmarks.py), answer extraction (extract.py), scores
(metrics.py), `evaluate` in generation and perplexity modes (runner.py, ppl.py), reports
(report.py) and the `vlmkit eval` command (cli.py). See docs/evaluation.md."""
