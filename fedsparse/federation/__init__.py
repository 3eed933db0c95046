"""The federated protocol on packed vectors: strategy, message keys, reply validation, byte accounting, client sampling, checkpoints and fault injection; no model, no data."""
