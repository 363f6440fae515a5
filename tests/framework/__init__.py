"""Helpers shared by the tests and the benchmarks (tests and bench): one place for each, see docs/testing.md."""
