"""Benchmarks. `python -m bench` runs every `bench_*.py` module here; `python -m bench polling` runs
one; each module also runs alone (`python -m bench.bench_polling`). Every module exposes
`main(argv: list[str]) -> int`."""
