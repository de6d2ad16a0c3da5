"""Messages, launchers and job scripts, without a cluster."""
import subprocess
import sys

import pytest

from scipion_cloudexec.cluster import bundle
from scipion_cloudexec.remote.jobs import JobFiles, JobSpec, JobState, LauncherSpec, job_script
from scipion_cloudexec.remote.launchers import launcher_for
from scipion_cloudexec.remote.schedulers import SLURM_STATES
from scipion_cloudexec.remote import messages as m

SECRET = b"s" * 32


def test_message_round_trip_with_blob():
    msg = m.Output(rid=7, job_id="j1", stream="stderr", offset=10, blob=b"\x00\xffbytes")
    back = m.decode(m.encode(msg, SECRET), SECRET)
    assert isinstance(back, m.Output)
    assert (back.rid, back.job_id, back.stream, back.offset, back.blob) == (
        7, "j1", "stderr", 10, b"\x00\xffbytes")


@pytest.mark.parametrize("tamper", ["secret", "body", "blob", "magic", "version"])
def test_tampered_or_forged_messages_are_refused(tamper):
    frames = m.encode(m.Output(job_id="j", blob=b"data"), SECRET)
    secret = SECRET
    if tamper == "secret":
        secret = b"x" * 32
    elif tamper == "body":
        frames[2] = frames[2].replace(b'"j"', b'"k"')
    elif tamper == "blob":
        frames[3] = b"DATA"
    elif tamper == "magic":
        frames[0] = b"XX"
    elif tamper == "version":  # re-stamped as another version, the MAC left as it was
        frames = m.encode(m.Output(job_id="j", blob=b"data"), SECRET)
        frames[0] = m.header(m.PROTOCOL_VERSION + 1)
        with pytest.raises(m.BadMessage):
            m.decode(frames, secret, protocol=m.PROTOCOL_VERSION + 1)
    with pytest.raises(m.BadMessage):
        m.decode(frames, secret)


@pytest.mark.parametrize("change", ["blob re-split", "blob split off the body",
                                    "body and blob merged", "empty frame added"])
def test_frames_cut_differently_are_refused(change):
    """The MAC binds the frame count and each frame's length: without the secret, frames
    cannot be re-split or merged (before protocol 2, a blob split in two decoded as a
    truncated chunk with a valid MAC)."""
    frames = m.encode(m.Output(job_id="j", offset=0, blob=b"0123456789"), SECRET)
    head, mac, body, blob = frames
    changed = {"blob re-split": [head, mac, body, blob[:4], blob[4:]],
               "blob split off the body": [head, mac, body[:-1], body[-1:] + blob],
               "body and blob merged": [head, mac, body + blob],
               "empty frame added": [head, mac, body, blob, b""]}[change]
    assert b"".join(changed[2:]) == b"".join(frames[2:]), "the same bytes, cut otherwise"
    with pytest.raises(m.BadMessage):
        m.decode(changed, SECRET)


def test_more_frames_than_a_message_has_are_refused_before_hashing():
    frames = m.encode(m.Output(job_id="j", blob=b"data"), SECRET) + [b"x"] * 1000
    with pytest.raises(m.BadMessage, match="1004 frames, at most 4"):
        m.decode(frames, SECRET)


def test_a_message_of_another_protocol_version_is_named_as_such():
    import hashlib
    import hmac
    body = b'{"rid":3,"client":"old","version":"0.0.9+abc","protocol":1,"t":"Hello","v":1}'
    legacy = [b"CX", hmac.new(SECRET, body, hashlib.sha256).digest(), body]  # protocol 1
    future = m.encode(m.Hello(rid=4, client="new"), SECRET, protocol=m.PROTOCOL_VERSION + 1)
    for frames, version in ((legacy, 1), (future, m.PROTOCOL_VERSION + 1)):
        with pytest.raises(m.OtherProtocol, match="protocol version %d, expected %d"
                           % (version, m.PROTOCOL_VERSION)) as e:
            m.decode(frames, SECRET)
        assert e.value.protocol == version
        hello, claimed = m.decode_hello(frames, SECRET)  # authentic: it can be answered
        assert claimed == version and hello.rid in (3, 4)
        answer = m.refusal(hello.rid, claimed, SECRET, "speak %d" % m.PROTOCOL_VERSION)
        if version == 1:  # what a protocol-1 client checks: b"CX", HMAC(body), v == 1
            assert answer[0] == b"CX" and hmac.compare_digest(
                answer[1], hmac.new(SECRET, answer[2], hashlib.sha256).digest())
            assert b'"v":1' in answer[2] and b'"t":"Error"' in answer[2]
        else:  # a later client decodes it with its own version
            error = m.decode(answer, SECRET, protocol=claimed)
            assert (error.kind, error.rid, error.detail) == ("protocol", 4,
                                                             "speak %d" % m.PROTOCOL_VERSION)
    assert m.decode_hello(m.encode(m.Hello(), b"x" * 32, protocol=9), SECRET) is None, \
        "a forged Hello of another version is not answered"


def spec(**kw):
    base = dict(job_id="j", argv=["prog", "a b"], ranks=4, threads=2, gpus=[0, 1])
    base.update(kw)
    return JobSpec(**base)


def test_launchers_build_argv(tmp_path):
    files = JobFiles(str(tmp_path), "j")
    (tmp_path / "j").mkdir()
    s = spec(launcher=LauncherSpec(kind="mpirun", mpirun=["mpirun", "--bind-to", "none"],
                                   hosts=["n1:2", "n2"]))
    argv = launcher_for("mpirun").command(s, files)
    assert argv[:5] == ["mpirun", "--bind-to", "none", "-np", "4"]
    assert argv[-2:] == ["prog", "a b"] and "--hostfile" in argv
    assert open(files.hostfile).read() == "n1 slots=2\nn2\n"
    assert ["-x", "CUDA_VISIBLE_DEVICES"] == argv[argv.index("CUDA_VISIBLE_DEVICES") - 1:
                                                 argv.index("CUDA_VISIBLE_DEVICES") + 1]
    s = spec(launcher=LauncherSpec(kind="slurm", srun=["srun", "--mpi=pmix"]))
    assert launcher_for("slurm").command(s, files) == ["srun", "--mpi=pmix", "prog", "a b"]
    assert launcher_for("local").command(spec(ranks=1), files) == ["prog", "a b"]
    with pytest.raises(ValueError, match="unknown launcher"):
        launcher_for("pbs")


def test_job_script_records_exit_code_and_environment(tmp_path):
    files = JobFiles(str(tmp_path), "j")
    (tmp_path / "j").mkdir()
    s = spec(ranks=3, env={"MY_VAR": "it's here"}, env_setup="export FROM_SETUP=yes")
    s.argv = ["/bin/sh", "-c", 'echo "$CLOUDEXEC_RANK $CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS '
              '$MY_VAR $FROM_SETUP"; exit 5']
    with open(files.script, "w") as f:
        f.write(job_script(s, files, launcher_for("local").command(s, files)))
    p = subprocess.run(["/bin/sh", files.script], capture_output=True, text=True)
    assert p.returncode == 5 and files.read_rc() == 5
    assert sorted(p.stdout.splitlines()) == ["%d 0,1 2 it's here yes" % r for r in range(3)]


def test_an_exit_code_left_empty_reads_as_not_ended_and_the_pool_records_the_real_one(
        tmp_path):
    """The job script writes ``rc`` in place (no tmp + mv: a fork per job); a script killed
    between the open and the write leaves it empty (the kill mid-write is simulated by
    creating the empty file: the window is too short to hit for real). Read as "not ended",
    never as a code; the worker pool, which saw the process end, records the real one."""
    from scipion_cloudexec.remote import pool
    files = JobFiles(str(tmp_path), "j")
    (tmp_path / "j").mkdir()
    open(files.rc, "w").close()
    assert files.read_rc() is None
    task = {"job_id": "j", "script": files.script, "rc": files.rc}
    assert pool.end_task(task, str(tmp_path / "pool"), -15) == 143
    assert files.read_rc() == 143


def test_missing_working_directory_is_reported(tmp_path):
    files = JobFiles(str(tmp_path), "j")
    (tmp_path / "j").mkdir()
    with open(files.script, "w") as f:
        f.write(job_script(spec(cwd="/no/such/dir"), files, ["true"]))
    p = subprocess.run(["/bin/sh", files.script], capture_output=True, text=True)
    assert p.returncode == 126 and "/no/such/dir does not exist on the cluster" in p.stderr


def test_job_spec_validation():
    for bad in (dict(job_id="../x"), dict(argv=[]), dict(ranks=0),
                dict(env={"1BAD": "x"}), dict(launcher=LauncherSpec(kind="pbs"))):
        with pytest.raises(ValueError):
            spec(**bad).validate()
    assert JobSpec.from_dict(spec().to_dict()) == spec()


def test_slurm_state_table_covers_final_states():
    assert SLURM_STATES["PENDING"] == JobState.QUEUED
    assert SLURM_STATES["TIMEOUT"] == JobState.TIMEOUT and not SLURM_STATES["RUNNING"].final
    assert SLURM_STATES["NODE_FAIL"] == JobState.LOST
    assert {s for s in SLURM_STATES.values() if s.final} == {
        JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.LOST}


def test_bundle_is_deterministic_and_self_contained(tmp_path):
    data, version = bundle.build()
    bundle.build.cache_clear()
    assert bundle.build() == (data, version)
    path = tmp_path / "agent.zip"
    path.write_bytes(data)
    # runs with nothing but the zip on the path, and knows its own hash
    p = subprocess.run([sys.executable, "-I", str(path),
                        "version"], capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == version
