"""The Model tab: backbone, weights and strategy."""
