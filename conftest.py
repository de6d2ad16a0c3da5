"""Loaded by pytest before the package (whose import pulls in pyworkflow): pyworkflow reads
its configuration from the environment when first imported, so it is set here."""
import os as _os
import sys as _sys

# pyworkflow reads its configuration when first imported: set it before anything imports it
SCIPION_ROOT = _os.environ.get("CLOUDEXEC_TEST_SCIPION") or "/tmp/cloudexec-scipion-%d" % _os.getpid()
_os.environ.update(SCIPION_DOMAIN="pwem", SCIPION_HOME=SCIPION_ROOT,
                   SCIPION_USER_DATA=_os.path.join(SCIPION_ROOT, "userdata"),
                   SCIPION_PYTHON=_sys.executable, SCIPION_NOTIFY="False",
                   # hash memos and staging endpoints of tests: never the user's ~/.cache
                   XDG_CACHE_HOME=_os.path.join(SCIPION_ROOT, "cache"),
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
_os.makedirs(_os.path.join(SCIPION_ROOT, "config"), exist_ok=True)
_os.makedirs(_os.path.join(SCIPION_ROOT, "userdata", "projects"), exist_ok=True)
HOSTS_CONF = """[localhost]
PARALLEL_COMMAND = mpirun --oversubscribe -np %_(JOB_NODES)d %_(COMMAND)s
NAME = cloudexec
MANDATORY = 0
SUBMIT_COMMAND = true
SUBMIT_TEMPLATE = #!/bin/sh
    %_(JOB_COMMAND)s
CANCEL_COMMAND = {python} -m scipion_cloudexec.cli cancel %_(JOB_ID)s
CHECK_COMMAND = true
QUEUES = {{"cluster": [["QUEUE_FOR_JOBS", "Y", "Steps on the cluster", "Keep Y"],
                      ["CLOUD_TIME", "", "Wall time", "SLURM wall time per job"]]}}
""".format(python=_sys.executable)
with open(_os.path.join(SCIPION_ROOT, "config", "hosts.conf"), "w") as _f:
    _f.write(HOSTS_CONF)



def pytest_sessionfinish(session, exitstatus):
    if not _os.environ.get("CLOUDEXEC_TEST_SCIPION"):
        import shutil
        shutil.rmtree(SCIPION_ROOT, ignore_errors=True)
