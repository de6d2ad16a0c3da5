"""Bad input is refused where it is given, with a message naming it: job ids, environment
names and values, and desktop paths rewritten only where a path starts."""
import os
import time

import pytest

from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.remote.jobs import JobSpec
from scipion_cloudexec.executors.translate import PathMapper, RunJobCall


@pytest.mark.parametrize("field,value,named", [
    ("job_id", "step-1\n", "job_id"),
    ("env", {"OMP\n": "1"}, "OMP"),
    ("env", {"X": 4}, "X"),
    ("env_prepend", {"PATH": None}, "PATH"),
])
def test_job_specs_with_bad_values_are_refused(field, value, named):
    spec = JobSpec(job_id="ok-1", argv=["true"])
    setattr(spec, field, value)
    with pytest.raises(ValueError, match=named):
        spec.validate()


def test_submit_refuses_a_non_string_environment_value_before_sending(cluster):
    client = ClusterSession(cluster)  # never started: the refusal comes before any message
    with pytest.raises(ValueError, match="environment variable X"):
        client.submit(["true"], env={"X": 4})


def test_desktop_paths_are_rewritten_only_where_a_path_starts():
    m = PathMapper("/mnt/data/proj", "/scratch/mirror", "/usr/bin/python3",
                   [("/apps/x", "/opt/x")], local_python="/desk/python")
    assert m("/mnt/data/proj/Runs/1/a.mrc") == "/scratch/mirror/Runs/1/a.mrc"
    assert m("--i=/mnt/data/proj/a --o '/mnt/data/proj'") == "--i=/scratch/mirror/a --o '/scratch/mirror'"
    assert m("a:/apps/x/bin,/mnt/data/proj/b") == "a:/opt/x/bin,/scratch/mirror/b"
    assert m("/mnt/data/projX/a") == "/mnt/data/projX/a", "another folder with that prefix"
    assert m("/backup/mnt/data/proj/a") == "/backup/mnt/data/proj/a", "inside another path"


def test_bulk_transfers_with_a_known_hosts_path_holding_spaces(make_cluster, testbed, tmp_path):
    import os
    import shutil
    from scipion_cloudexec.cluster.stager import Stager
    from scipion_cloudexec.cluster.ssh import SSHConnection, Target
    keys = tmp_path / "my keys"
    keys.mkdir()
    known = keys / "known hosts"
    shutil.copy(testbed.known_hosts, known)
    before = known.read_bytes()
    c = make_cluster("local", transfer="openssh", known_hosts=str(known))
    proj = tmp_path / "proj"
    (proj / "movies").mkdir(parents=True)
    (proj / "movies" / "m.tiff").write_bytes(os.urandom(2 << 20))
    ssh = SSHConnection(Target.of(c))
    ssh.connect()
    st = Stager(ssh, c, hash_cache=str(tmp_path / "h.sqlite"))
    try:
        r = st.stage_in(str(proj), ["movies"], "proj")
        assert r.bytes_sent == 2 << 20 and st._bulk_chan is not None
    finally:
        st.close()
        ssh.close()
    assert known.read_bytes() == before, "known_hosts is never written"


def test_a_damaged_bundle_on_the_cluster_is_replaced_not_run(make_cluster, tmp_path):
    import os
    import stat
    from scipion_cloudexec.cluster import bundle
    from scipion_cloudexec.cluster.session import ClusterSession
    c = make_cluster("local")
    with ClusterSession(c) as client:
        client.submit(["true"]).result()
    assert stat.S_IMODE(os.stat(c.workdir).st_mode) == 0o700, "the workdir is private"
    zpath = bundle.remote_path(c)
    from scipion_cloudexec.tests.conftest import _stop_agent
    _stop_agent(c.workdir)
    with open(zpath, "r+b") as f:  # damaged (or altered) on the cluster
        f.seek(100)
        f.write(b"XXXX")
    with ClusterSession(c) as client:
        assert client.submit(["echo", "fine"]).result().exit_code == 0
    with open(zpath, "rb") as f:
        assert f.read() == bundle.build()[0], "uploaded again"


def start_error(cluster, **start) -> str:
    """The AgentStartError's text of a session start on *cluster* (the session closed)."""
    from scipion_cloudexec.cluster.errors import AgentStartError
    from scipion_cloudexec.cluster.session import ClusterSession
    session = ClusterSession(cluster)
    try:
        with pytest.raises(AgentStartError) as e:
            session.start(**start)
    finally:
        session.close()
    return str(e.value)


def test_a_workdir_that_cannot_be_made_is_named_with_the_reason(make_cluster, tmp_path):
    import dataclasses
    c = make_cluster("local")
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    text = start_error(dataclasses.replace(c, workdir=str(blocker / "work")), stage=True)
    assert text.startswith("cannot create %s/agent/bundles on %s: " % (blocker / "work", c.name))
    assert "Not a directory" in text, text
    assert blocker.read_text() == "in the way"


def test_a_start_that_fails_silently_names_the_exit_the_log_and_what_it_printed(make_cluster):
    """A start that exits non-zero with nothing on stderr (here the cluster's env_setup)
    says so, where the agent's log is, and what came on stdout: it once said only
    "(exit 1):"."""
    import dataclasses
    c = make_cluster("local")
    text = start_error(dataclasses.replace(c, env_setup="echo loading modules; exit 1"))
    assert text.startswith("the agent did not start on %s (exit 1, nothing on stderr); its "
                           "log there: %s/agent/agent.log" % (c.name, c.workdir)), text
    assert "stdout:\nloading modules" in text, text


def test_a_start_runs_one_remote_command_once_the_bundle_is_there(make_cluster):
    # each remote command pays the user's shell start-up (~/.bashrc, module systems): a
    # start with the bundle in place used two (its check, then the agent's start)
    from scipion_cloudexec.cluster.session import ClusterSession
    # once the desktop knows the agent, none: it is reached through a port forward, and so
    # is its staging endpoint; a stale memory (the agent gone) costs the one command again
    import json
    import signal
    from scipion_cloudexec.cluster import endpoints
    c = make_cluster("local")
    counts, kinds = [], []
    for i in range(4):  # new workdir: bundle uploaded; bundle there; agent known; agent gone
        if i == 1:
            endpoints.forget(c)  # as a desktop that never reached it
        if i == 3:
            with open(os.path.join(c.workdir, "agent", "agent.json")) as f:
                pid = json.load(f)["pid"]
            os.kill(pid, signal.SIGTERM)
            while os.path.exists("/proc/%d" % pid):
                time.sleep(0.05)
        session = ClusterSession(c)
        ran = []
        real = session.ssh.run
        session.ssh.run = lambda cmd, **k: (ran.append(cmd), real(cmd, **k))[1]
        try:
            session.start(stage=True)
            assert session.submit(["true"]).result().exit_code == 0
            if i in (0, 3):
                assert session.stager._chan is not None, "the staging server started with it"
            session.stager.mirrors()
            kinds.append(session.stager._chan.kind)
        finally:
            session.close()
        counts.append(len(ran))
    assert counts[0] > 1 and counts[1:] == [1, 0, 1], counts
    assert kinds == ["paramiko", "paramiko", "endpoint", "paramiko"], kinds


@pytest.mark.parametrize("says", [b"", b"SSH-2.0-OpenSSH_9.2\r\n"],
                         ids=["silent", "banner-then-silent"])
def test_a_port_that_accepts_but_never_completes_ssh_is_unreachable_after_connect_timeout(
        testbed, says):
    """A link that dies after the TCP connect, or a port that is not SSH: paramiko's
    start_client returned quietly when its time was up, and the next call raised a bare
    'No existing session' (and its banner/auth waits were 15-30 s, not connect_timeout)."""
    import socket
    import threading
    from scipion_cloudexec.cluster.ssh import HostUnreachable, SSHConnection, Target
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    held = []

    def answer():
        conn, _ = server.accept()
        held.append(conn)
        conn.sendall(says)  # then nothing more
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    try:
        with pytest.raises(HostUnreachable) as e:
            SSHConnection(Target("127.0.0.1", port, testbed.user, testbed.client_key,
                                 "/nonexistent/known_hosts", connect_timeout=1.0)).connect()
        assert "127.0.0.1:%d" % port in str(e.value)
        assert "did not complete the SSH handshake within 1 s" in str(e.value)
    finally:
        thread.join(5)
        for c in held:
            c.close()
        server.close()


def test_an_unreachable_cluster_fails_the_step_at_once_with_its_name_and_the_fix(
        make_cluster, clusters_env, new_project):
    import socket
    from scipion_cloudexec.protocols.protocol_shell import ProtCloudShellSteps
    from scipion_cloudexec.tests.test_executor import launch, logs
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there: connection refused
    c = make_cluster("local", port=port, name="nowhere")
    clusters_env(c)
    project = new_project("unreachable")
    prot = launch(project, project.newProtocol(ProtCloudShellSteps, chain="true"), c)
    assert prot.isFailed()
    error = prot.getErrorMessage()
    assert "giving up" in error and "nowhere" in error and "refused" in error.lower()
    assert "tried there again" not in logs(prot), "no retry of a cluster that refuses"


def test_a_same_size_rewrite_within_the_mtime_granularity_is_hashed_again(tmp_path):
    """Filesystems with 1 s mtimes: a rewrite of the same size in the same second looks
    unchanged by size, mtime and inode; the memo must not keep the old hash."""
    import hashlib
    import os
    from scipion_cloudexec.remote.hashing import HashCache
    path = tmp_path / "star.txt"
    path.write_bytes(b"iteration 1\n")
    st = os.stat(path)
    second = st.st_mtime_ns - st.st_mtime_ns % 1_000_000_000
    os.utime(path, ns=(second, second))
    memo = HashCache(str(tmp_path / "memo.sqlite"))
    assert memo.get(str(path)) == hashlib.sha256(b"iteration 1\n").hexdigest()
    memo.flush()
    with open(path, "r+b") as f:  # same size, same inode, within the same second
        f.write(b"iteration 2\n")
    os.utime(path, ns=(second, second))
    assert memo.get(str(path)) == hashlib.sha256(b"iteration 2\n").hexdigest()
    memo.close()


def test_two_links_to_one_folder_are_both_walked(tmp_path):
    import os
    from scipion_cloudexec.cluster.local_files import _walk_dir
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "m.mrc").write_bytes(b"x")
    run = tmp_path / "Runs" / "000003_X"
    run.mkdir(parents=True)
    os.symlink(str(data), run / "first")
    os.symlink(str(data), run / "second")
    os.symlink("..", run / "first" / "sub" / "loop")  # a cycle is still cut
    files = sorted(rel for rel, entry in _walk_dir(str(run), "Runs/000003_X", (), set())
                   if entry is not None)
    assert files == ["Runs/000003_X/first/sub/m.mrc", "Runs/000003_X/second/sub/m.mrc"]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b'{"t": "Ping"}'])
def test_an_authenticated_body_that_is_not_a_message_is_a_bad_message(body):
    from scipion_cloudexec.remote import messages as m
    secret = b"s" * 32
    head = m.header(m.PROTOCOL_VERSION)
    frames = [head, m._mac(secret, head, body, []), body]
    with pytest.raises(m.BadMessage):
        m.decode(frames, secret)


def test_a_message_that_cannot_be_encoded_fails_its_future_not_the_connection(cluster):
    from scipion_cloudexec.remote import jobs
    with ClusterSession(cluster) as client:
        # past the desktop's checks (a bug there, or a plugin's object): JSON refuses it
        bad = client.submit(["true"], label="x")
        original = jobs.JobSpec.to_dict
        try:
            jobs.JobSpec.to_dict = lambda self: dict(original(self), label=object())
            broken = client.submit(["true"])
        finally:
            jobs.JobSpec.to_dict = original
        with pytest.raises(ValueError, match="cannot be sent"):
            broken.result(timeout=30)
        assert bad.result(timeout=30).exit_code == 0
        assert client.submit(["echo", "still here"]).result(timeout=30).exit_code == 0


def test_inputs_outside_the_project_are_named_by_their_staged_copy(private_cluster, private_host,
                                                                   tmp_path):
    """An input outside the project travels under ``_external/`` in the mirror, and the
    command names that copy: the host cannot see the desktop's path. An input under a
    ``path_map`` folder does not travel: the command names its twin on the cluster."""
    import os
    import shlex
    from dataclasses import replace
    from scipion_cloudexec.executors.runner import ClusterRunner, ProtocolRun
    from scipion_cloudexec.cluster.ssh import SSHConnection, Target
    ext = tmp_path / "microscope"
    (ext / "stack").mkdir(parents=True)
    (ext / "gain.mrc").write_bytes(b"GAIN" * 1000)
    (ext / "stack" / "b.txt").write_text("frames\n")
    shared = tmp_path / "beegfs"  # the cluster sees it as <work>/beegfs
    shared.mkdir()
    (shared / "ref.txt").write_text("desktop copy: must not travel\n")
    twin = "%s/%s-beegfs" % (private_host.work, tmp_path.name)
    ssh = SSHConnection(Target.of(private_cluster))
    ssh.connect()
    try:
        assert ssh.run("mkdir -p %s && echo cluster copy > %s/ref.txt"
                       % (twin, twin)).exit_status == 0
        cluster = replace(private_cluster, path_map=((str(shared), twin),))
        project = tmp_path / "proj"
        run_dir = project / "Runs" / "000002_ProtX"
        (run_dir / "extra").mkdir(parents=True)
        run = ProtocolRun(str(project), "proj", str(run_dir), 2)
        inputs = [str(ext / "gain.mrc"), str(ext / "stack"), str(shared / "ref.txt")]
        runner = ClusterRunner(cluster, run, inputs=lambda: inputs)
        try:
            line = "cat %s %s/b.txt %s > extra/out.txt" % tuple(
                shlex.quote(p) for p in (str(ext / "gain.mrc"), str(ext / "stack"),
                                         str(shared / "ref.txt")))
            call = RunJobCall("/bin/sh", "-c %s" % shlex.quote(line), cwd=str(run_dir))
            record = runner.run_job(call, step_id=1, job_id=run.job_id(1), label="external",
                                    say=lambda s: None)
        finally:
            runner.close()
        assert record["state"] == "done", record
        assert (run_dir / "extra" / "out.txt").read_bytes() == \
            b"GAIN" * 1000 + b"frames\ncluster copy\n"
        assert not any("beegfs" in p for p in record["inputs"]), record["inputs"]
        assert os.path.join("_external", str(ext / "gain.mrc").lstrip("/")) in record["inputs"]
    finally:
        ssh.run("rm -rf %s" % twin)
        ssh.close()


def test_steps_waiting_to_reach_an_unreachable_cluster_share_one_attempt(make_cluster,
                                                                         tmp_path):
    """A link cut while n steps ran there: each step reconnects. They used to queue on the
    runner's lock and each wait out connect_timeout in turn (n x the timeout before the last
    could fail over). Steps that waited while another's attempt failed now get its error:
    counted here as the connections the unreachable cluster saw."""
    import socket
    import threading
    from scipion_cloudexec.cluster.ssh import HostUnreachable
    from scipion_cloudexec.executors.runner import ClusterRunner, ProtocolRun
    server = socket.socket()  # accepts and stays silent: a host that never completes SSH
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except socket.timeout:
                pass
    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    c = make_cluster("local", port=server.getsockname()[1], name="silent", connect_timeout=1.0)
    run_dir = tmp_path / "proj" / "Runs" / "000002_ProtX"
    run_dir.mkdir(parents=True)
    runner = ClusterRunner(c, ProtocolRun(str(tmp_path / "proj"), "proj", str(run_dir), 2))
    errors = []

    def step():
        try:
            runner.connect()
        except Exception as e:
            errors.append(e)
    steps = [threading.Thread(target=step) for _ in range(6)]
    try:
        for t in steps:
            t.start()
        for t in steps:
            t.join(60)
    finally:
        stop.set()
        acceptor.join(5)
        for conn in accepted:
            conn.close()
        server.close()
        runner.close()
    assert len(errors) == 6 and all(isinstance(e, HostUnreachable) for e in errors), errors
    assert "silent" in str(errors[0]) or str(c.port) in str(errors[0])
    assert len(accepted) <= 2, "%d connection attempts for 6 waiting steps" % len(accepted)
