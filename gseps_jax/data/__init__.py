"""Data: tfds builders (flickr30k_karpathy, coco_karpathy, synthetic_regions), the TF-free input
pipeline, the WordPiece tokenizer and `prepare` (see each module's docstring)."""
