"""Reading a job's output: accuracy metrics, scoring and pictures."""
