"""What a sweep produces from its jobs' files: tables, statistics, plots and report.html."""
