"""The training objectives: the label loss (base), distillation from a teacher (DeiT, NKD), USKD's
self-distillation, DCAL's uncertainty-weighted branches, and the factory that picks the run's."""
