"""The remote agent and its client.

Agent side (shipped to the cluster, stdlib + pyzmq): ``server``, ``journal``,
``jobs``, ``launchers``, ``schedulers``. Client side: ``client`` (futures for
remote jobs), ``bundle`` (ships the agent code). Import the client API from
``scipion_cloudexec.agent.client``; this file stays empty so the shipped bundle
needs nothing but the agent-side modules.
"""
