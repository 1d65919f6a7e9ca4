"""Network namespaces for tests that need real network faults (root and iproute2 only)."""

import os
import shutil
import subprocess


def ip(*args):
    """Run ``ip ARGS``; RuntimeError with its message if it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, timeout=10)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.decode().strip()}")


def remove(*names):
    """Delete these namespaces, whichever exist (their links go with them)."""
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def unusable():
    """Why namespaces joined by veth pairs and a bridge cannot be made here, or None if they can."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (ip)"
    name = f"pxq{os.getpid()}"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "add", "br0", "type", "bridge")
        ip("-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return f"cannot build network namespaces with a bridge and veth pairs: {e}"
    finally:
        remove(name)
    return None
