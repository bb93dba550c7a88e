"""Functional ops: validation, torch.library registration, autograd, backend dispatch."""
