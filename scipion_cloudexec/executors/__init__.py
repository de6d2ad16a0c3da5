"""Executors: the pyworkflow seam (``Protocol.setStepsExecutor``) and the executor
classes that send a protocol's ``runJob`` calls to a cluster. Built on
``scipion_cloudexec.cluster.session.ClusterSession``; see docs/ARCHITECTURE.md."""
