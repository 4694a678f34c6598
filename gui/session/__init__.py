"""The window's one state (state.py: the draft config, the open folder and run, the jobs) and the two-way bindings
of widgets to its fields (binding.py)."""
