# The one place fastattn's version is written: fastattn.__version__ and the package metadata
# (pyproject.toml reads it as a dynamic attribute) both come from here.
__version__ = "0.1.0"
