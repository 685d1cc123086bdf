"""Command-line tools around the serving application: the CLI, the demo, deployment helpers and
predictor training."""
