"""Statistics: segmentation and classification metrics, surface distances, classification
and paired statistics."""
