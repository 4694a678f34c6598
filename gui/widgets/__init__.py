"""Widgets the tabs share: the image grid and the thumbnail loader behind it."""
