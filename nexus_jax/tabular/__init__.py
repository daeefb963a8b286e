"""Tabular tasks: objectives and metrics for binary / multiclass / regression prediction."""
