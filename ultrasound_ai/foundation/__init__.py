"""Ultrasound foundation model (USFM): ViT, dual-masking pre-training, segmentation and classification."""
