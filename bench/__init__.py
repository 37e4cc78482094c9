"""diffem's benchmarks (``make bench``); results land in ``bench/results/``."""
