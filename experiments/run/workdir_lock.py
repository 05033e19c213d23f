"""One run at a time per workdir: a lock file held while a run writes there.

``hold(workdir)`` takes ``WORKDIR/.workdir.lock`` for the life of a run (the
experiments' ``cli.run_main`` does it for every entry point with a ``--workdir``).
The lock is an advisory ``flock`` on that file, which holds the holder's pid,
host, command and start time. A second run on the same workdir does not wait:
it raises ``WorkdirBusy`` at once, one line naming the holder and what to do.

A lock whose holder died (killed, crashed, machine rebooted) is stale and is
recovered automatically: the kernel drops a dead process's ``flock``, and a lock
file naming a pid that is no longer alive on this host is taken over (with a
warning). On a filesystem without ``flock`` (some network mounts) the pid check
alone decides.

>>> import tempfile
>>> workdir = tempfile.mkdtemp()
>>> with hold(workdir):
...   try:
...     with hold(workdir):
...       pass
...   except WorkdirBusy as busy:
...     print("busy:", busy.holder["pid"] == os.getpid())
busy: True
>>> os.path.exists(os.path.join(workdir, LOCK_NAME))
False
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time

from experiments.run import errors

LOCK_NAME = ".workdir.lock"

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Not POSIX: the pid check alone.
  fcntl = None


class WorkdirBusy(errors.UserError):
  """Another live run holds the workdir's lock.

  Attributes:
    holder: what the lock file says about its holder (pid, host, command, started).
  """

  def __init__(self, message: str, holder: dict):
    super().__init__(message)
    self.holder = holder


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


def _read_holder(path: str) -> dict:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def _is_stale(holder: dict) -> bool:
  """A holder recorded on this host whose process is gone."""
  pid = holder.get("pid")
  return (holder.get("host") == socket.gethostname() and isinstance(pid, int)
          and not _pid_alive(pid))


def _busy(workdir: str, path: str, holder: dict) -> WorkdirBusy:
  if holder:
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "an unknown time")
    who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
           f"{when}, command: {holder.get('command')!r}")
  else:
    who = "another run that is starting (its details are not written yet)"
  return WorkdirBusy(
      f"--workdir={workdir} is in use by {who}. Wait for that run to finish "
      "(its lock goes when it exits), or use another --workdir; if that process "
      f"is gone (e.g. on another host that crashed), delete {path}.", holder)


def _flock(fd: int) -> bool:
  """True if this process now holds ``fd``'s flock, False if another does."""
  if fcntl is None:
    return True
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError as error:
    if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return False
    if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
      return True  # No flock on this filesystem: the pid check decides.
    raise


def acquire(workdir: str) -> int:
  """Takes the lock (a file descriptor to pass to ``release``) or raises
  ``WorkdirBusy``; recovers a stale lock."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  for _ in range(10):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      if not _flock(fd):
        raise _busy(workdir, path, _read_holder(path))
      # The file may have been released and unlinked between open and flock.
      if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
        holder = _read_holder(path)
        if holder and holder.get("pid") != os.getpid() and not _is_stale(holder):
          if fcntl is None or holder.get("host") != socket.gethostname():
            raise _busy(workdir, path, holder)
        if holder and _is_stale(holder):
          errors.warn(f"recovered the stale lock of {workdir} (pid "
                      f"{holder.get('pid')} on this host is gone)")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": " ".join([os.path.basename(sys.executable)]
                                      + sys.argv),
                  "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return fd
    except BaseException:
      os.close(fd)
      raise
    os.close(fd)
  raise _busy(workdir, path, _read_holder(path))


def release(workdir: str, fd: int) -> None:
  """Removes the lock file and drops the lock."""
  path = os.path.join(workdir, LOCK_NAME)
  try:
    if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
      os.remove(path)
  except OSError:
    pass
  finally:
    os.close(fd)


def _missing_folders(workdir: str) -> list[str]:
  """``workdir`` and its ancestors that do not exist yet, deepest first."""
  missing, folder = [], os.path.abspath(workdir)
  while not os.path.exists(folder) and os.path.dirname(folder) != folder:
    missing.append(folder)
    folder = os.path.dirname(folder)
  return missing


@contextlib.contextmanager
def hold(workdir: str):
  """Holds ``workdir``'s lock for the ``with`` block (see the module doc).

  Folders made only to hold the lock are removed again if the run left them
  empty (a run refused for a bad flag leaves no workdir behind).
  """
  created = _missing_folders(workdir)
  fd = acquire(workdir)
  try:
    yield
  finally:
    release(workdir, fd)
    for folder in created:
      try:
        os.rmdir(folder)  # Only if empty.
      except OSError:
        break
