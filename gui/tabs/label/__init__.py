"""The Label tab: labelling an unsorted folder."""
