"""The P-RGE engine: seeded directions, LoRA-FA adapters, the batched zeroth-order estimator and baselines."""
