"""One folder per tab, each holding the tab and its panels and controllers."""
