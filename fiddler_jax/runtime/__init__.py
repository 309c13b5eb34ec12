"""Execution of the model: generation now; placement, planners, lanes and the hybrid engine later."""
