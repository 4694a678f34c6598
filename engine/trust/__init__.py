"""How far a prediction can be trusted: temperature calibration (calibration) and familiarity (familiarity)."""
