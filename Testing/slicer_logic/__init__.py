"""Tests of the Slicer module's logic (a package, so its conftest never shadows Testing/conftest.py)."""
