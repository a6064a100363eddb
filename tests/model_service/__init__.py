"""Tests of the model service: core units (no network) and the real process through tritonclient."""
