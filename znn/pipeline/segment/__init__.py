"""Blockwise segmentation of boundary and affinity maps larger than memory (`znn segment`)."""
