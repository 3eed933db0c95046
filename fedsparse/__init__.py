"""fedsparse: federated fine-tuning with compact, shared-support updates (PaFi, HiWi) on Flower."""

__version__ = "0.1.0"
