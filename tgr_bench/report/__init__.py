"""Reporting: run directories in, tables and plots out.

It reads run records (`run.json`, `results.csv`) only: never attack classes, never configs of
attacks, so a table means what the runs recorded.
"""
