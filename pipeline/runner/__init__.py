"""Lightning wiring: the module (module.py), the masking and writing callbacks (callbacks.py), the run (run.py)."""
