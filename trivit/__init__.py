"""trivit: training vision transformers with sparsity in examples, tokens and attention."""

__version__ = "0.1.0"
