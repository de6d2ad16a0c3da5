"""Scheduling: which cluster runs a job when a protocol uses several, and what happens when
one of them goes away.

``policy.py`` holds the small interface a developer implements to change the choice
(:class:`~.policy.Policy`), with the default :class:`~.policy.CapacityPolicy`;
``dispatcher.py`` runs jobs through it, with failover and retries.
"""
