"""Benchmarks against PEFT: `adapterkit bench` (train_speed) and python -m adapterkit.bench.mixed_batch."""
