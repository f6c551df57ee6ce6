"""Shared core: settings, structured logging and the model-card schema every service reads."""
