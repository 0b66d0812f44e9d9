"""Ray jobs: training, streaming input, sweeps, registry promotion, evaluation and the `vitae` CLI."""
