"""Commands built on the training loop or the model: NViT pruning, the keep-rate evaluation, the speed bench."""
