"""What training computes: the heads table, losses, paired augmentation and the train/eval
steps."""
