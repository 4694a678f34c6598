"""The Predict tab: predict a folder, export CSV, sort into folders."""
