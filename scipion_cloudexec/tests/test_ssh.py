"""SSH against the test bed's real sshd: host keys checked, key auth, clear refusals."""
import socket
import subprocess

import pytest

from scipion_cloudexec.cluster.session import ClusterSession
from scipion_cloudexec.cluster.ssh import (AuthRefused, HostKeyChanged, HostUnreachable,
                                             SSHConnection, Target, UnknownHostKey)


def target(tb, **kw):
    values = dict(host="127.0.0.1", port=tb.sshd_port, user=tb.user, identity_file=tb.client_key,
                  known_hosts=tb.known_hosts, connect_timeout=5)
    values.update(kw)
    return Target(**values)


def test_known_host_and_key_connect_and_run(testbed):
    with SSHConnection(target(testbed)) as ssh:
        r = ssh.run("echo out; echo err >&2; exit 3")
    assert (r.exit_status, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


def test_unknown_host_key_is_refused_with_fingerprint_and_line(testbed, tmp_path, reliability):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKey) as e:
        SSHConnection(target(testbed, known_hosts=str(empty))).connect()
    hostkey = open(testbed.sshd_dir + "/ssh_host_ed25519_key.pub").read().split()[1]
    fp = subprocess.run(["ssh-keygen", "-lf", testbed.sshd_dir + "/ssh_host_ed25519_key.pub"],
                        capture_output=True, text=True).stdout.split()[1]
    text = str(e.value)
    assert fp in text, "the fingerprint OpenSSH shows must be in the message"
    assert "[127.0.0.1]:%d ssh-ed25519 %s" % (testbed.sshd_port, hostkey) in text
    assert empty.read_text() == "", "an unknown key must never be added silently"
    reliability(fault="unknown host key", when="first connection", seen="UnknownHostKey with "
                "the fingerprint OpenSSH shows and the known_hosts line to add after checking",
                recover_s="refused at once; nothing is sent", lost=0, twice=0)


def test_changed_host_key_is_refused(testbed, tmp_path, reliability):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "known_hosts"
    kh.write_text("[127.0.0.1]:%d %s\n" % (testbed.sshd_port,
                                           " ".join(open(str(other) + ".pub").read().split()[:2])))
    with pytest.raises(HostKeyChanged, match="HOST KEY CHANGED.*ssh-keygen -f .* -R"):
        SSHConnection(target(testbed, known_hosts=str(kh))).connect()
    reliability(fault="changed host key", when="any connection", seen="HostKeyChanged: 'HOST "
                "KEY CHANGED ... Someone may be intercepting ...' with the ssh-keygen -R command",
                recover_s="refused at once; nothing is sent", lost=0, twice=0)


def test_wrong_user_key_is_refused(testbed, tmp_path):
    key = tmp_path / "id_other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with pytest.raises(AuthRefused, match="refused the key.*authorized_keys"):
        SSHConnection(target(testbed, identity_file=str(key))).connect()
    with pytest.raises(AuthRefused, match="does not exist"):
        SSHConnection(target(testbed, identity_file=str(tmp_path / "missing"))).connect()


def test_unreachable_host_is_named(testbed):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HostUnreachable, match="cannot reach 127.0.0.1:%d" % port):
        SSHConnection(target(testbed, port=port)).connect()


def test_missing_remote_python_names_the_key(make_cluster):
    from scipion_cloudexec.cluster.errors import AgentStartError
    c = make_cluster("local", python="/opt/nowhere/bin/python3")
    with pytest.raises(AgentStartError, match="python '/opt/nowhere/bin/python3' not found.*"
                                              "set 'python'"):
        ClusterSession(c).start()


def test_remote_python_without_pyzmq_is_explained(make_cluster):
    from scipion_cloudexec.cluster.errors import AgentStartError
    c = make_cluster("local", python="/usr/bin/python3", packages="no")  # else installed
    probe = subprocess.run(["/usr/bin/python3", "-c", "import zmq"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the system python has pyzmq here")
    with pytest.raises(AgentStartError, match="lacks pyzmq"):
        ClusterSession(c).start()


def test_openssh_bulk_client_checks_host_keys_like_paramiko(testbed, tmp_path):
    """The system ssh used for bulk data refuses an unknown or changed host key and never
    writes known_hosts, as the paramiko side does."""
    from scipion_cloudexec.cluster.ssh import openssh_argv
    good = subprocess.run(openssh_argv(target(testbed), "echo ok"), capture_output=True,
                          text=True, timeout=30)
    assert (good.returncode, good.stdout) == (0, "ok\n")
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = subprocess.run(openssh_argv(target(testbed, known_hosts=str(empty)), "echo ok"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 255 and r.stdout == ""
    assert "Host key verification failed" in r.stderr
    assert empty.read_text() == "", "an unknown key must never be added silently"
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    empty.write_text("[127.0.0.1]:%d %s\n" % (testbed.sshd_port,
                                              " ".join(open(str(other) + ".pub").read().split()[:2])))
    r = subprocess.run(openssh_argv(target(testbed, known_hosts=str(empty)), "echo ok"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 255 and r.stdout == "" and "HOST IDENTIFICATION HAS CHANGED" in r.stderr
