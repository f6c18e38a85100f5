"""Turns a folder of run records into tables, trade-off plots, a rank recommendation and a report."""
