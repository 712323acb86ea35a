"""The Ray Data job over a dataset. From Python: ``run_job(job_from_options({...}))``."""

from hired_batch.job.options import job_from_options
from hired_batch.job.run import JobSummary, run_job

__all__ = ["JobSummary", "job_from_options", "run_job"]
