"""Data files of the evaluation suite (shipped as package data, with their licences)."""
