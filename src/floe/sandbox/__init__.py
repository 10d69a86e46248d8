"""Local emulators of the SaaS APIs floe talks to, and generators of sample export files.

They are part of the product (`floe sandbox`, `floe demo`) and of the test suite.
"""
