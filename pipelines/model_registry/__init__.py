"""Registered models: aliases and promotion, evaluation, prediction, registration."""
