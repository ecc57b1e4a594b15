"""Mutation testing of kl_precond (run by hand, not in CI): ``python tests/mutation/run.py``."""
