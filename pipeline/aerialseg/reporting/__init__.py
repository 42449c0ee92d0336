"""Reporting: report.md with figures, and model profiles (parameters, FLOPs, latency)."""
