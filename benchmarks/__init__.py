"""On-demand speed and memory benchmarks (`python -m benchmarks`, `python -m benchmarks.sd3_step`, from the
repository root; see benchmarks/README.md); never part of the test suite."""
