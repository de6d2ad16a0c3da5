"""The clusters file: one INI section per remote cluster.

Example::

    [cluster gpu-cloud]
    host = 203.0.113.7
    user = alice
    identity_file = ~/.ssh/id_ed25519
    workdir = /scratch/alice/cloudexec
    python = /opt/cloudexec/venv/bin/python
    launcher = slurm
    slots = 64

Where the file is found: ``--config FILE`` on the command line, else
``$SCIPION_CLOUDEXEC_CONFIG``, else ``$SCIPION_HOME/config/cloudexec.conf``.
Every error names the file, the line (or key) and what to write instead.
"""
from .clusters import (
    CONFIG_ENV,
    ClusterConfig,
    ConfigError,
    KEYS,
    LAUNCHERS,
    default_config_path,
    load_clusters,
    load_groups,
    parse_clusters,
    parse_groups,
)

__all__ = [
    "CONFIG_ENV", "ClusterConfig", "ConfigError", "KEYS", "LAUNCHERS",
    "default_config_path", "load_clusters", "load_groups", "parse_clusters", "parse_groups",
]
