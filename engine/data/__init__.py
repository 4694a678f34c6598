"""Image folders: scanning a folder into classes and splits (folder), decoding pixels (decode), the per-image
split draw (splits), deep-grey scans (deep_grey), the user's edits to a folder: exclude lists and moves (edits),
and the labels file of an unsorted folder (labels)."""
