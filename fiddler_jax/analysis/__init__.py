"""Analyses of model behaviour (routing statistics) used by the notebooks."""
