"""Analyses of the suite's runs, used from the repository root (not installed): the gradient derivation checks
(`gradients.py`, also a CLI), sweep results as tables and plots (`results.py`), and the notebooks in `notebooks/`."""
