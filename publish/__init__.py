"""RESULTS.md, its figures and the README's tables, from the runs committed under results/ (python -m publish)."""
