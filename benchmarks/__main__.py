"""`python -m benchmarks [--size-gb N]`: run the benchmarks and print ratio tables."""

from benchmarks.conversion import main

main()
