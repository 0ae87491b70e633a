"""`himoe bench`: speed and memory against the baselines."""
