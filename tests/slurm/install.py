"""Slurm and munge on this machine: installed with apt-get when missing, or SlurmUnavailable (tests skip)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NEEDED_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged", "munge")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or run here (tests skip with this reason)."""


def which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in NEEDED_BINARIES if which(b) is None]


def require_slurm(install: bool = True, timeout: float = 600) -> None:
    """Make sure slurm + munge are installed and usable, or raise SlurmUnavailable."""
    if sys.platform != "linux":
        raise SlurmUnavailable("local Slurm cluster needs Linux")
    if os.geteuid() != 0:
        raise SlurmUnavailable("local Slurm cluster needs root (slurmd runs jobs as root, munged as munge)")
    if missing_binaries() and install:
        apt = which("apt-get")
        if apt is None:
            raise SlurmUnavailable(f"slurm binaries {missing_binaries()} missing and no apt-get to install them")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = [apt, "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:  # stale package lists: update once and retry
            subprocess.run(
                [apt, "-o", "DPkg::Lock::Timeout=300", "update"],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise SlurmUnavailable(
                "apt-get install %s failed (rc=%d): %s"
                % (" ".join(APT_PACKAGES), out.returncode, (out.stderr or out.stdout)[-1500:])
            )
    missing = missing_binaries()
    if missing:
        raise SlurmUnavailable(f"slurm binaries missing: {missing}")
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError as e:
        raise SlurmUnavailable("user 'munge' does not exist (munge package broken?)") from e
