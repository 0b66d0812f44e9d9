"""Hyperparameter sweeps with Ray Tune: the sweep config and the sweep driver."""
