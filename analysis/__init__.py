"""Analyses of the suite's runs: the gradient derivation checks (`gradient_identities.py`, the identities on tensors;
`gradients.py`, on a policy's sampled groups and a run's checkpoints; `gradient_plots.py`; the command is
`experiments/gradients.py`), sweep results as tables and plots (`results.py`), and the notebooks in `notebooks/`."""
