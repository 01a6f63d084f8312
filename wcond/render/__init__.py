"""Rendering: results as text for the terminal, scripts, CI and browsers; one module per format or kind of result."""
