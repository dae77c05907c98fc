"""The toy world: prompt grammar and splits, renderer, scorers, quality model, fidelity."""
