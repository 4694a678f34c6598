"""The Dataset tab: the folder, its classes and split, the map, and the dataset doctor (panel + controller)."""
