"""Benchmark parts with no service behind them: the closed-loop load generator, the raw floors, reports."""
