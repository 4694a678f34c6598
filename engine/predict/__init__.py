"""Using a trained run: predicting a folder (predictions), scoring a labelled folder (evaluate), export, heatmaps
and sorting predicted images into folders (sorting)."""
