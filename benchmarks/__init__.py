"""On-demand benchmarks (`python -m benchmarks`, see benchmarks/README.md); never part of the test suite.
The other scripts in this folder are experiments, run as files."""
