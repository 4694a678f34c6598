"""Training a classifier: the job (fit), automatic mode (auto), feature extraction and its linear head (head),
the bookkeeping both loops share (meters), and fine-tuning (fine_tuning/)."""
