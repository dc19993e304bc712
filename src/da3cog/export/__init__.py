"""Exporters: a Prediction in, complete files out; they never modify the Prediction."""
