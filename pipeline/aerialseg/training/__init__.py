"""Training: the one loop for training, OpenEarthMap pretraining and distillation; losses; DDP."""
