"""The run's model as files: building it (timm's ViT or a pruned architecture), its starting weights,
its export, and the names of what a run writes."""
