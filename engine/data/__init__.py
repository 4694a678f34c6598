"""Image folders: scanning a folder into classes and splits (folder), decoding pixels (decode), the per-image
split draw (splits), deep-grey scans (deep_grey), and the user's edits to a folder: exclude lists and moves (edits)."""
