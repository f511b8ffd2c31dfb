"""Scoring any model's images: CLIP score and FID from local CLIP weights, per category, and run comparisons."""
