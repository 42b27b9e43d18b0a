"""python -m bench: bench.figures's main."""
from bench.figures import main

main()
