"""Scipion's hosts.conf as a user gets it: the README's snippet, the file ``hostsconf --write``
makes, both read by pyworkflow's own reader; and what a protocol launched with no queue picked
(or "Steps on the cluster" not Y) tells the user."""
import os
import re
import subprocess
import sys

import pytest

from scipion_cloudexec.tests.conftest import clusters_file_text

PY = sys.executable
README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def cli(*args, cwd=None):
    return subprocess.run([PY, "-m", "scipion_cloudexec.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def load_hosts(path):
    """pyworkflow's own hosts.conf reader (it calls sys.exit on a file it cannot read)."""
    from pyworkflow.protocol.hosts import HostConfig
    return HostConfig.load(str(path))


def readme_hosts_conf() -> str:
    text = open(README).read()
    blocks = re.findall(r"```ini\n(.*?)```", text, re.S)
    found = [b for b in blocks if "[localhost]" in b]
    assert len(found) == 1, "the README shows one hosts.conf"
    return found[0]


def test_readme_hosts_conf_loads_as_printed(tmp_path):
    path = tmp_path / "hosts.conf"
    path.write_text(readme_hosts_conf())
    hosts = load_hosts(path)  # before: "File contains no section headers"
    qs = hosts["localhost"].getQueueSystem()
    assert qs.getName() == "cloudexec"
    assert list(qs.queues) == ["hpc", "gpu-box"]
    assert qs.queues["hpc"][0][:2] == ["QUEUE_FOR_JOBS", "Y"]
    assert hosts["localhost"].getCancelCommand() == "scipion-cloudexec cancel %(JOB_ID)s"
    assert "queue-submit" in hosts["localhost"].getSubmitCommand()


@pytest.fixture
def clusters_conf(make_cluster, tmp_path):
    a, b = make_cluster("local"), make_cluster("mpirun", time="01:00:00")
    path = tmp_path / "clusters.conf"
    path.write_text(clusters_file_text(a, b) + "\n[group pair]\nclusters = %s, %s\n"
                    % (a.name, b.name))
    return str(path), a, b


def test_hostsconf_writes_queues_scipion_reads_and_merges_idempotently(clusters_conf, tmp_path):
    conf, a, b = clusters_conf
    hosts = tmp_path / "hosts.conf"
    mine = ("; my own notes\n[localhost]\nPARALLEL_COMMAND = mpirun --oversubscribe -np "
            "%_(JOB_NODES)d %_(COMMAND)s\nSCIPION_HOME = /opt/scipion\n\n"
            "[bigiron]\nPARALLEL_COMMAND = srun %_(COMMAND)s\n")
    hosts.write_text(mine)
    r = cli("--config", conf, "hostsconf", "--write", str(hosts))
    assert r.returncode == 0, r.stderr
    assert "wrote [localhost] with queues %s, %s, pair, all" % (a.name, b.name) in r.stdout
    backups = [p for p in os.listdir(tmp_path) if p.startswith("hosts.conf.bak-")]
    assert len(backups) == 1 and (tmp_path / backups[0]).read_text() == mine
    assert "previous file kept as %s" % (tmp_path / backups[0]) in r.stdout

    loaded = load_hosts(hosts)
    assert list(loaded) == ["localhost", "bigiron"], "other sections kept"
    local = loaded["localhost"]
    assert local.mpiCommand.get().startswith("mpirun --oversubscribe"), "the user's kept"
    assert local.getScipionHome() == "/opt/scipion"
    qs = local.getQueueSystem()
    assert qs.getName() == "cloudexec" and list(qs.queues) == [a.name, b.name, "pair", "all"]
    params = {p[0]: p for p in qs.queues[b.name]}
    assert params["QUEUE_FOR_JOBS"][1] == "Y" and "mpirun launcher, 4 slots" in \
        params["QUEUE_FOR_JOBS"][3]
    assert set(params) == {"QUEUE_FOR_JOBS", "CLOUD_POOL", "CLOUD_RETRIES", "CLOUD_RECONNECT",
                           "CLOUD_JOBS"}
    for cmd in (local.getSubmitCommand(), local.getCancelCommand()):
        exe = cmd.split()[0]
        assert os.path.isabs(exe) and os.access(exe, os.X_OK), cmd
        assert "--config %s" % os.path.abspath(conf) in cmd
    assert local.getCancelCommand() % {"JOB_ID": "x:y"} == \
        "%s --config %s cancel x:y" % (local.getCancelCommand().split()[0], conf)

    before = hosts.read_text()
    r = cli("--config", conf, "hostsconf", "--write", str(hosts))
    assert r.returncode == 0 and "already up to date" in r.stdout
    assert hosts.read_text() == before, "a second write changes nothing"
    assert len([p for p in os.listdir(tmp_path) if p.startswith("hosts.conf.bak-")]) == 1

    printed = cli("--config", conf, "hostsconf")
    assert printed.returncode == 0 and "QUEUES = {" in printed.stdout


def test_hostsconf_refuses_a_host_holding_another_queue_system(clusters_conf, tmp_path):
    conf, _a, _b = clusters_conf
    hosts = tmp_path / "hosts.conf"
    hosts.write_text("[localhost]\nNAME = SLURM\nSUBMIT_COMMAND = sbatch %_(JOB_SCRIPT)s\n")
    r = cli("--config", conf, "hostsconf", "--write", str(hosts))
    assert r.returncode == 2 and "already holds the queue system 'SLURM'" in r.stderr
    assert "--host NAME" in r.stderr
    assert "SLURM" in hosts.read_text() and "cloudexec" not in hosts.read_text()
    r = cli("--config", conf, "hostsconf", "--write", str(hosts), "--host", "clouds")
    assert r.returncode == 0, r.stderr
    assert load_hosts(hosts)["clouds"].getQueueSystem().getName() == "cloudexec"


@pytest.mark.parametrize("picked", ["nothing", "steps N"])
def test_launching_without_a_usable_queue_choice_says_what_to_pick(make_cluster, clusters_env,
                                                                  new_project, tmp_path, picked):
    from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps
    c = make_cluster("local")
    conf = clusters_env(c)
    project = new_project("submit")
    hosts = tmp_path / "generated-hosts.conf"
    r = cli("--config", conf, "hostsconf", "--write", str(hosts))
    assert r.returncode == 0, r.stderr
    # the project reads it (as it would read $SCIPION_HOME/config/hosts.conf at start);
    # the session's own hosts.conf is left as it is
    project._hosts = load_hosts(hosts)
    prot = project.newProtocol(ProtCloudShellSteps, chain="echo never > extra/ran.txt")
    os.makedirs(prot._getExtraPath(), exist_ok=True)
    prot._useQueue.set(True)  # "Use queue? Yes"
    if picked == "steps N":
        prot.setQueueParams([c.name, {"QUEUE_FOR_JOBS": "N"}])
    # "nothing": the queue dialog left as it opens, with no queue
    project.launchProtocol(prot)  # as the form's Execute does: Scipion stores the failure
    prot = project.getProtocol(prot.getObjId())
    assert prot.isFailed(), prot.getStatus()
    error = prot.getErrorMessage()
    assert "There was a problem submitting this protocol to the queue engine" in error
    if picked == "nothing":
        assert "no queue was chosen in the queue dialog" in error and c.name in error
    else:
        assert "'Steps on the cluster' is 'N' for cluster %s: it must be Y" % c.name in error
    assert not os.path.exists(os.path.join(prot._getExtraPath(), "ran.txt"))
