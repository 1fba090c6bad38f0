"""The functional operators, one file per operator (the same name as its NumPy code, launcher
and kernel); :mod:`roi_cupy.ops` is their public face."""
