"""The Training tab: settings, the log and the live plots."""
