"""Labelling an unsorted folder: which images to ask about next (picks), and the job that trains on the labels so far
and suggests a class for every other image (session). The labels file itself is engine/data/labels.py."""
