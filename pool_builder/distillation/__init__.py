"""How students learn: the KD and CKD losses, the training loops, and data-parallel library distillation."""
