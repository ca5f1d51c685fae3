"""What a run and a study report: the run's report (report/report.md, grid, loss curves), the
study's report, and the scores (top-1, IOR, HLR, LRS) of every image set under each protocol.
Read from the run's artifacts; written beside them. The Prefect tasks that publish them to the
UI are in tasks/ (prefect_tasks.py, study_tasks.py)."""
