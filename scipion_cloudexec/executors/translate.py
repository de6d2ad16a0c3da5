"""From a pyworkflow ``runJob`` call on the desktop to the same command on a cluster.

Pure functions, no I/O: what runs where is decided here and tested alone.

* The command line is pyworkflow's own (``programName params``, GPU placeholders filled),
  run by ``/bin/sh -c`` on the cluster; the launcher puts ``mpirun -np N`` (or ``srun``) in
  front, exactly as a local MPI run puts its ``PARALLEL_COMMAND``.
* Local absolute paths are rewritten: the project folder becomes the cluster's mirror, the
  desktop's Python becomes the cluster's ``python``, ``path_map`` prefixes their remote twins,
  and an input outside the project its staged copy in the mirror's ``_external/``.
* Only the environment the plugin *added* travels (``Plugin.getEnviron()`` minus the desktop's
  own variables); PATH-like variables travel as prefixes of the cluster's own value.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from pyworkflow.constants import RUN_JOB_GPU_PARAM, RUN_JOB_GPU_PARAM_SEARCH

from ..remote.jobs import JobSpec

PATH_LIKE = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "LIBRARY_PATH", "CPATH", "MANPATH")
# never sent: they describe the desktop session, not the program
LOCAL_ONLY = {"HOME", "USER", "LOGNAME", "PWD", "OLDPWD", "SHELL", "TERM", "DISPLAY", "HOSTNAME",
              "SSH_AUTH_SOCK", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY", "TMPDIR", "LANG", "_",
              "SHLVL", "XDG_RUNTIME_DIR", "MAIL"}


@dataclass(frozen=True)
class RunJobCall:
    """One ``runJob`` as the protocol made it on the desktop: desktop paths, pyworkflow's
    GPU slots. :func:`translate` turns it into the cluster's :class:`JobSpec`."""
    program: str
    params: object  # a string or a list, as runJob takes it
    ranks: int = 1
    threads: int = 1
    gpus: Tuple[int, ...] = ()
    env: Optional[Mapping[str, str]] = None
    cwd: Optional[str] = None


def shown(spec: JobSpec) -> str:
    """The command line of *spec* as the cluster's shell reads it (log and provenance)."""
    if spec.argv[:2] == ["/bin/sh", "-c"] and len(spec.argv) == 3:
        return spec.argv[2]
    return " ".join(shlex.quote(a) for a in spec.argv)


class PathMapper:
    """Rewrites desktop absolute paths into their cluster twins, longest prefix first."""

    def __init__(self, project_root: str, mirror_root: str, python: str,
                 path_map: Sequence[Tuple[str, str]] = (), local_python: str = sys.executable,
                 staged: Sequence[Tuple[str, str]] = ()):
        """*staged*: (local path, remote path) of inputs outside the project that were
        staged into the mirror (under ``_external/``)."""
        pairs = [(os.path.abspath(project_root), mirror_root), (local_python, python)]
        pairs += [(os.path.abspath(local), remote) for local, remote in staged]
        real = os.path.realpath(project_root)
        if real != os.path.abspath(project_root):
            pairs.append((real, mirror_root))
        pairs += list(path_map)
        self.pairs = sorted(pairs, key=lambda p: -len(p[0]))
        # a path only where one starts (not inside another path) and up to a separator
        self._re = re.compile("|".join("(?<![\\w./-])(%s)(?=[/\\s\"':;,]|$)" % re.escape(local)
                                       for local, _ in self.pairs))

    def __call__(self, text: str) -> str:
        def sub(m: "re.Match[str]") -> str:
            return self.pairs[m.lastindex - 1][1]  # type: ignore[operator]
        return self._re.sub(sub, text)

    def cwd(self, cwd: Optional[str], project_root: str) -> str:
        """The job's working folder on the cluster; the protocol process runs in the project."""
        local = os.path.abspath(cwd or project_root)
        return self(local)


def command_line(program: str, params, gpus: Sequence[int], ranks: int) -> str:
    """pyworkflow's own command line for a runJob (see pyworkflow.utils.process), as its
    queue path writes it: the job sees only its GPUs (``CUDA_VISIBLE_DEVICES``, which the
    agent may set to other GPUs than asked when another client holds those), so programs
    name them 0..k-1, and a program that sets the variable itself sets it to that value."""
    if not isinstance(params, str):
        params = " ".join('"%s"' % p for p in params)
    if gpus:
        params = params % {RUN_JOB_GPU_PARAM: " ".join(str(i) for i in range(len(gpus)))}
        if "CUDA_VISIBLE_DEVICES" in program:
            program = program % {RUN_JOB_GPU_PARAM: '"$CUDA_VISIBLE_DEVICES"'}
    if ranks > 1 and program.startswith("xmipp") and not program.startswith("xmipp_mpi"):
        program = program.replace("xmipp", "xmipp_mpi")
    return ("%s %s" % (program, params)).strip()


def environment(env: Optional[Mapping[str, str]], local: Mapping[str, str],
                mapper: PathMapper) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(variables to set, PATH-like prefixes) that the plugin added to the desktop's env."""
    sets: Dict[str, str] = {}
    prepends: Dict[str, str] = {}
    for key, value in (env or {}).items():
        if key in LOCAL_ONLY or local.get(key) == value or not re.match(r"^[A-Za-z_]\w*$", key):
            continue
        old = local.get(key, "")
        if key in PATH_LIKE:
            added = value[:-len(old)].rstrip(":") if old and value.endswith(old) else value
            if added:
                prepends[key] = mapper(added)
        else:
            sets[key] = mapper(str(value))
    return sets, prepends


def remote_gpus(assigned: Sequence[int], cluster_gpus: Sequence[int]) -> List[int]:
    """GPU slots pyworkflow assigned (0..k-1 when a queue is used) as the cluster's GPU numbers."""
    if not cluster_gpus:
        return [int(g) for g in assigned]
    return [cluster_gpus[int(g) % len(cluster_gpus)] for g in assigned]


def translate(call: RunJobCall, *, project_root: str, mapper: PathMapper,
              cluster_gpus: Sequence[int] = (),
              local_env: Mapping[str, str] = os.environ) -> JobSpec:
    """The cluster's version of *call*: the job as the wire carries it (its id, launcher
    and client are the session's to fill in)."""
    # more slots than the cluster has GPUs wrap around: each GPU once (CUDA_VISIBLE_DEVICES
    # with a GPU twice would show the job fewer devices than its command names)
    rgpus = list(dict.fromkeys(remote_gpus(call.gpus, cluster_gpus)))
    uses_placeholder = (RUN_JOB_GPU_PARAM_SEARCH in str(call.params) or
                        RUN_JOB_GPU_PARAM_SEARCH in call.program)
    line = mapper(command_line(call.program, call.params, rgpus if uses_placeholder else [],
                               call.ranks))
    sets, prepends = environment(call.env, local_env, mapper)
    env = call.env
    prepend = getattr(env, "getPrepend", lambda: "")() if env is not None else ""
    if prepend:
        line = "%s %s" % (mapper(prepend), line)
    return JobSpec(job_id="", argv=["/bin/sh", "-c", line], ranks=max(1, int(call.ranks)),
                   threads=max(1, int(call.threads)), gpus=rgpus, env=sets,
                   env_prepend=prepends, cwd=mapper.cwd(call.cwd, project_root))
