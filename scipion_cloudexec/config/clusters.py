"""Parse and validate the clusters file (see the package docstring)."""
from __future__ import annotations

import configparser
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..remote.launchers import LAUNCHERS as _LAUNCHERS

CONFIG_ENV = "SCIPION_CLOUDEXEC_CONFIG"
#: the launcher values of the clusters file (the registry: remote/launchers.py)
LAUNCHERS = tuple(kind for kind, cls in _LAUNCHERS.items() if cls.configurable)
SECTION_RE = re.compile(r"^cluster\s+([A-Za-z0-9][A-Za-z0-9_.-]*)$")
GROUP_RE = re.compile(r"^group\s+([A-Za-z0-9][A-Za-z0-9_.-]*)$")


class ConfigError(ValueError):
    """The clusters file is missing or wrong; the message says where and how to fix it."""


def _positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise ValueError("must be a whole number greater than 0")
    return n


def _port(value: str) -> int:
    n = int(value)
    if not 0 < n < 65536:
        raise ValueError("must be a TCP port between 1 and 65535")
    return n


def _seconds(value: str) -> float:
    n = float(value)
    if n <= 0:
        raise ValueError("must be a number of seconds greater than 0")
    return n


def _launcher(value: str) -> str:
    kinds = [kind for kind, cls in _LAUNCHERS.items() if cls.configurable]  # as registered now
    if value not in kinds:
        raise ValueError("must be one of: %s" % ", ".join(kinds))
    return value


TRANSFERS = ("auto", "openssh", "paramiko")
PACKAGES = ("auto", "index", "upload", "no")


def _packages(value: str) -> str:
    if value not in PACKAGES:
        raise ValueError("must be one of: %s" % ", ".join(PACKAGES))
    return value


def _transfer(value: str) -> str:
    if value not in TRANSFERS:
        raise ValueError("must be one of: %s" % ", ".join(TRANSFERS))
    return value


STREAMS_MAX = 16


def _streams(value: str) -> str:
    value = value.strip().lower()
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= STREAMS_MAX:
        raise ValueError("must be auto or a number of streams from 1 to %d" % STREAMS_MAX)
    return str(n)


def _gpus(value: str) -> Tuple[int, ...]:
    items = [v for v in re.split(r"[,\s]+", value.strip()) if v]
    try:
        return tuple(int(v) for v in items)
    except ValueError:
        raise ValueError("must be GPU numbers separated by commas, e.g. 0,1") from None


def _command(value: str) -> Tuple[str, ...]:
    argv = tuple(shlex.split(value))
    if not argv:
        raise ValueError("must not be empty")
    return argv


def _words(value: str) -> Tuple[str, ...]:
    return tuple(v for v in re.split(r"[,\s]+", value.strip()) if v)


def _path_map(value: str) -> Tuple[Tuple[str, str], ...]:
    pairs = []
    for line in re.split(r"[\n;]+", value):
        if not line.strip():
            continue
        local, sep, remote = line.partition("=")
        if not sep or not local.strip().startswith("/") or not remote.strip().startswith("/"):
            raise ValueError("must be lines of LOCAL_PREFIX = REMOTE_PREFIX (absolute paths)")
        pairs.append((local.strip().rstrip("/"), remote.strip().rstrip("/")))
    return tuple(pairs)


def _text(value: str) -> str:
    return value.strip()


def _path(value: str) -> str:
    return os.path.expanduser(value.strip())


@dataclass(frozen=True)
class Key:
    """One key of a ``[cluster NAME]`` section."""
    name: str
    parse: Callable[[str], object]
    required: bool
    default: object
    help: str
    example: str


#: Every key a cluster section may hold, in the order the README documents them.
KEYS: Dict[str, Key] = {k.name: k for k in [
    Key("host", _text, True, None, "SSH host name or address of the head node", "hpc.example.org"),
    Key("port", _port, False, 22, "SSH port", "22"),
    Key("user", _text, True, None, "remote user name", "alice"),
    Key("identity_file", _path, True, None, "private key for SSH key authentication", "~/.ssh/id_ed25519"),
    Key("known_hosts", _path, False, "~/.ssh/known_hosts",
        "known_hosts file that must hold the head node's host key", "~/.ssh/known_hosts"),
    Key("workdir", _text, True, None,
        "remote root for the agent, job folders, project mirrors and the staging cache "
        "(absolute path on the cluster)", "/scratch/alice/cloudexec"),
    Key("python", _text, True, None,
        "remote Python 3.9+ (pyzmq, and mpi4py for the worker pool, are added into the "
        "workdir if it lacks them)", "/opt/cloudexec/venv/bin/python"),
    Key("launcher", _launcher, True, None,
        "how jobs start: mpirun (direct), slurm (sbatch + srun) or local (plain processes)", "mpirun"),
    Key("slots", _positive_int, True, None, "cores this plugin may use on the cluster", "32"),
    Key("gpus", _gpus, False, (), "GPU numbers the plugin may hand to jobs", "0,1"),
    Key("env_setup", _text, False, "",
        "shell lines run before each job (one per line, indented continuation lines)",
        "module load openmpi relion"),
    Key("mpirun", _command, False, ("mpirun",), "MPI launch command prefix (launcher mpirun)",
        "mpirun --bind-to none"),
    Key("hosts", _words, False, (),
        "compute nodes for mpirun's hostfile, as NAME or NAME:SLOTS (empty: the head node only)",
        "node1:16 node2:16"),
    Key("srun", _command, False, ("srun",), "SLURM step launch prefix inside the batch job",
        "srun --mpi=pmix"),
    Key("partition", _text, False, "", "SLURM partition (empty: the cluster's default)", "gpu"),
    Key("account", _text, False, "", "SLURM account (empty: none)", "cryoem-lab"),
    Key("time", _text, False, "", "SLURM wall time limit per job (empty: the partition's)", "04:00:00"),
    Key("path_map", _path_map, False, (),
        "where local program and library folders are on the cluster, one "
        "LOCAL_PREFIX = REMOTE_PREFIX per line", "/opt/scipion/software = /apps/scipion/software"),
    Key("heartbeat", _seconds, False, 2.0,
        "seconds between heartbeats; the agent is declared lost after 3 missed beats", "2"),
    Key("connect_timeout", _seconds, False, 15.0, "seconds to wait for the SSH connection", "15"),
    Key("agent_idle_timeout", _seconds, False, 3600.0,
        "seconds the agent stays up with no client and no running job", "3600"),
    Key("transfer", _transfer, False, "auto",
        "what carries large uploads: openssh (the system's ssh client, its C ciphers are "
        "~1.8x faster than paramiko), paramiko, or auto (openssh when `ssh` is installed)",
        "auto"),
    Key("streams", _streams, False, "auto",
        "parallel OpenSSH streams for files of 64 MB and more (cut into chunks): auto (start "
        "at 4, add 2 while throughput grows by 10%, at most 16) or a fixed number 1-16",
        "auto"),
    Key("packages", _packages, False, "auto",
        "how the agent gets pyzmq when `python` lacks it, into the workdir: index (the "
        "cluster's pip and package index), upload (wheels sent from the desktop), auto (index, "
        "else upload) or no (fail, saying how to install it)", "auto"),
    Key("wheelhouse", _path, False, "",
        "a desktop folder of wheels to upload when the cluster has no package index "
        "(empty: downloaded with pip on the desktop when needed)", "~/cloudexec-wheels"),
]}


@dataclass(frozen=True)
class ClusterConfig:
    """One remote cluster, as read from the clusters file. Plain data: nothing connects."""
    name: str
    host: str
    user: str
    identity_file: str
    workdir: str
    python: str
    launcher: str
    slots: int
    port: int = 22
    known_hosts: str = os.path.expanduser("~/.ssh/known_hosts")
    gpus: Tuple[int, ...] = ()
    env_setup: str = ""
    mpirun: Tuple[str, ...] = ("mpirun",)
    hosts: Tuple[str, ...] = ()
    srun: Tuple[str, ...] = ("srun",)
    partition: str = ""
    account: str = ""
    time: str = ""
    path_map: Tuple[Tuple[str, str], ...] = ()
    heartbeat: float = 2.0
    connect_timeout: float = 15.0
    agent_idle_timeout: float = 3600.0
    transfer: str = "auto"
    streams: str = "auto"
    packages: str = "auto"
    wheelhouse: str = ""
    source: str = field(default="", compare=False)

    @property
    def address(self) -> str:
        """``user@host:port``, for messages."""
        return "%s@%s:%d" % (self.user, self.host, self.port)


def default_config_path(explicit: Optional[str] = None) -> str:
    """The clusters file to read: *explicit*, else ``$SCIPION_CLOUDEXEC_CONFIG``,
    else ``$SCIPION_HOME/config/cloudexec.conf``."""
    if explicit:
        return explicit
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV]
    home = os.environ.get("SCIPION_HOME")
    if home:
        return os.path.join(home, "config", "cloudexec.conf")
    raise ConfigError("No clusters file: pass --config FILE, or set %s=FILE, "
                      "or SCIPION_HOME (the file is then $SCIPION_HOME/config/cloudexec.conf)."
                      % CONFIG_ENV)


def load_clusters(path: Optional[str] = None) -> Dict[str, ClusterConfig]:
    """Read and validate the clusters file; see :func:`default_config_path`.

    Raises:
        ConfigError: the file is missing, unreadable or wrong.
    """
    path = default_config_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("%s: clusters file not found. Create it with one [cluster NAME] "
                          "section per cluster (see the README, 'The clusters file')." % path) from None
    except OSError as e:
        raise ConfigError("%s: cannot read the clusters file: %s" % (path, e.strerror)) from None
    return parse_clusters(text, path)


def _line_numbers(text: str) -> Dict[Tuple[str, str], int]:
    """(section, key) -> line, and (section, '') -> the section's header line."""
    lines: Dict[Tuple[str, str], int] = {}
    section = ""
    for no, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*\[(.*)\]\s*$", line)
        if m:
            section = m.group(1).strip()
            lines.setdefault((section, ""), no)
            continue
        m = re.match(r"^([^\s#;=:][^=:]*?)\s*[=:]", line)
        if m:
            lines.setdefault((section, m.group(1).strip().lower()), no)
    return lines


def parse_clusters(text: str, path: str = "<clusters file>") -> Dict[str, ClusterConfig]:
    """Parse clusters-file *text*; *path* is only used in error messages.

    Raises:
        ConfigError: naming the file, line and key, and what to write instead.
    """
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       default_section="defaults")
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError("%s:%s: section [%s] appears twice; give each cluster its own name."
                          % (path, e.lineno, e.section)) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError("%s:%s: key '%s' appears twice in [%s]; keep one."
                          % (path, e.lineno, e.option, e.section)) from None
    except configparser.Error as e:
        raise ConfigError("%s: not a valid INI file: %s" % (path, e.message)) from None

    lines = _line_numbers(text)
    clusters: Dict[str, ClusterConfig] = {}
    for section in parser.sections():
        where = "%s:%s" % (path, lines.get((section, ""), "?"))
        if GROUP_RE.match(section.strip()):
            continue  # read by parse_groups
        m = SECTION_RE.match(section.strip())
        if not m:
            raise ConfigError("%s: section [%s] is not a cluster; write [cluster NAME] or "
                              "[group NAME] (NAME: letters, digits, '-', '_' or '.')."
                              % (where, section))
        name = m.group(1)
        if name in clusters:
            raise ConfigError("%s: cluster '%s' is defined twice; give each cluster its own name."
                              % (where, name))
        clusters[name] = _parse_section(name, parser[section], section, lines, path)
    if not clusters:
        raise ConfigError("%s: no cluster defined; add a [cluster NAME] section "
                          "(see the README, 'The clusters file')." % path)
    return clusters


def _parse_section(name: str, items: configparser.SectionProxy, section: str,
                   lines: Dict[Tuple[str, str], int], path: str) -> ClusterConfig:
    values: Dict[str, object] = {}
    for key, raw in items.items():
        line = lines.get((section, key)) or lines.get(("defaults", key), "?")
        where = "%s:%s" % (path, line)
        spec = KEYS.get(key)
        if spec is None:
            close = [k for k in KEYS if k.startswith(key[:3])]
            hint = " Did you mean '%s'?" % close[0] if close else ""
            raise ConfigError("%s: unknown key '%s' in [%s].%s Known keys: %s."
                              % (where, key, section, hint, ", ".join(KEYS)))
        try:
            values[key] = spec.parse(raw)
        except ValueError as e:
            raise ConfigError("%s: %s = %r in [%s] %s, e.g. %s = %s."
                              % (where, key, raw, section, _reason(e), key, spec.example)) from None
        if spec.required and values[key] in ("", ()):
            raise ConfigError("%s: %s is empty in [%s]; it is required (%s), e.g. %s = %s."
                              % (where, key, section, spec.help, key, spec.example))
    missing = [k for k, spec in KEYS.items() if spec.required and k not in values]
    if missing:
        where = "%s:%s" % (path, lines.get((section, ""), "?"))
        raise ConfigError("%s: [%s] lacks required key%s %s; add e.g.\n%s"
                          % (where, section, "s" if len(missing) > 1 else "", ", ".join(missing),
                             "\n".join("    %s = %s" % (k, KEYS[k].example) for k in missing)))
    if "known_hosts" not in values:
        values["known_hosts"] = os.path.expanduser(str(KEYS["known_hosts"].default))
    workdir = str(values["workdir"])
    if not workdir.startswith("/"):
        raise ConfigError("%s:%s: workdir = %s in [%s] must be an absolute path on the cluster, "
                          "e.g. workdir = %s." % (path, lines.get((section, "workdir"), "?"), workdir,
                                                  section, KEYS["workdir"].example))
    return ClusterConfig(name=name, source=path, **values)  # type: ignore[arg-type]


def _reason(e: ValueError) -> str:
    text = str(e)
    if text.startswith("invalid literal") or text.startswith("could not convert"):
        return "must be a number"
    return text


def parse_groups(text: str, clusters: Dict[str, ClusterConfig],
                 path: str = "<clusters file>") -> Dict[str, List[str]]:
    """``[group NAME]`` sections: ``clusters = a, b`` names clusters used together.

    Raises:
        ConfigError: unknown key, empty list, or a member that is no cluster.
    """
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       default_section="defaults")
    parser.read_string(text, source=path)
    lines = _line_numbers(text)
    groups: Dict[str, List[str]] = {}
    for section in parser.sections():
        m = GROUP_RE.match(section.strip())
        if not m:
            continue
        where = "%s:%s" % (path, lines.get((section, ""), "?"))
        keys = [k for k in parser[section] if k not in parser.defaults()]
        if keys != ["clusters"]:
            raise ConfigError("%s: [%s] takes one key, clusters = NAME, NAME...; found %s"
                              % (where, section, ", ".join(keys) or "none"))
        members = list(_words(parser[section]["clusters"]))
        unknown = [n for n in members if n not in clusters]
        if not members or unknown:
            raise ConfigError("%s: [%s] names %s; defined clusters: %s"
                              % (where, section, "no cluster" if not members else
                                 "unknown cluster(s) " + ", ".join(unknown), ", ".join(clusters)))
        groups[m.group(1)] = members
    return groups


def load_groups(path: Optional[str] = None) -> Dict[str, List[str]]:
    """The groups of the clusters file (see :func:`parse_groups`)."""
    path = default_config_path(path)
    clusters = load_clusters(path)
    with open(path, encoding="utf-8") as f:
        return parse_groups(f.read(), clusters, path)
