"""The dataset doctor: near copies, leaks, likely mislabels and outliers (findings), and the check that two images
are the same picture (same_picture)."""
