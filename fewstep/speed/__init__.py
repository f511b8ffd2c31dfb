"""Speed options: exact ones (`accel`: channels-last, fused projections, a tiny decoder; `compile`) and
approximations (`deepcache`, `accel` token downsampling, `quantize` / `int8`), each measured in
docs/BENCHMARKS.md."""
