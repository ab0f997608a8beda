"""The training side: config (config.py), stage plan and LR (schedule.py), DeepSpeed engines
(engine.py), checkpoints and exact resume (checkpoint.py), metrics (metrics.py), the loop and its CLI
(train.py), the final export (export.py) and sampling (sample.py). Nothing here imports Ray."""
