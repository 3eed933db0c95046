"""Privacy on top of the packed strategy: central and local differential privacy, SecAgg+."""
