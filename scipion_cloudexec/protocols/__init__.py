"""Protocols shipped by the plugin: real cryo-EM-shaped work (numpy, mrcfile, mpi4py)
that runs locally or on a cluster with identical results."""
