"""Staging: a project's input files up to a cluster's mirror (once, missing-only, verified,
resumable) and a job's outputs back, guarded against paths leaving the run folder.

Client side: ``client.Stager``. Cluster side (shipped with the agent): ``remote``, ``hashing``.
This file stays empty of imports so the shipped bundle needs nothing else.
"""
