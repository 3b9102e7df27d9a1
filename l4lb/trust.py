"""Whether a file or folder l4lb obeys could have been planted or changed by another user.

Theory of operation
-------------------
l4lb obeys two things it finds on disk beside its config: the state file (which backends
are in maint, where listeners route) and the folder of its control socket (whoever can
replace the socket can answer l4lb ctl and l4lb deploy in its place). If another local
user can write either, that user controls the balancer. The checks follow sshd's
StrictModes (OpenSSH misc.c safe_path): the path and every folder above it up to / must be
owned by root or by the user l4lb runs as, and not writable by group or others. One
exception, as the kernel's own protected_regular rule makes: a world-writable folder with
the sticky bit (/tmp) is accepted as a folder, since others can create files in it but
cannot rename or delete ours; a file in it must then itself be ours, which the check of
the file sees.

Symbolic links are resolved first (the link itself must be trustworthy too: in a sticky
folder another user's link would otherwise point us anywhere). Not covered: ACLs and
capabilities beyond the mode bits, as in sshd.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["untrusted_reason"]


def untrusted_reason(path) -> str | None:
    """Why `path` (a file or folder) and the folders above it are not to be trusted, or
    None when they are. Parts of the path that do not exist are skipped (nothing there
    can have been planted; creating them later fails or succeeds on its own), the folders
    that do exist are judged. An unreadable status is a reason."""
    path = Path(os.path.abspath(path))
    trusted = {0, os.geteuid()}
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        link = None
    except OSError as exc:
        return f"cannot check {path}: {exc.strerror}"
    if link is not None and stat.S_ISLNK(link.st_mode):
        if link.st_uid not in trusted:
            return f"{path} is a symbolic link owned by uid {link.st_uid}, not by root or us"
        path = Path(os.path.realpath(path))
    for node in [path, *path.parents]:
        try:
            st = os.stat(node)
        except FileNotFoundError:
            continue                   # not there: nothing planted; its folders are judged
        except OSError as exc:
            return f"cannot check {node}: {exc.strerror}"
        reason = _node_reason(node, st, trusted)
        if reason:
            return reason
    return None


def _node_reason(node: Path, st: os.stat_result, trusted: set[int]) -> str | None:
    if st.st_uid not in trusted:
        return f"{node} is owned by uid {st.st_uid}, not by root or the user l4lb runs as"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not writable:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None                    # sticky (/tmp): others cannot replace what is ours
    who = "group and others" if writable == (stat.S_IWGRP | stat.S_IWOTH) else (
        "its group" if writable == stat.S_IWGRP else "others")
    return f"{node} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
