"""What runs on the cluster: the agent daemon and everything it needs (stdlib + pyzmq).

The bundle shipped to a cluster is exactly this package plus ``version.py``
(``cluster/bundle.py``): its modules import nothing of ``scipion_cloudexec`` but each
other and ``version``. This file stays empty of code: the bundle ships it empty.
"""
