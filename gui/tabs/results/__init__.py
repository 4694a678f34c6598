"""The Results tab: runs, figures, confusion matrix, mistakes, confidence panel and heatmap view."""
