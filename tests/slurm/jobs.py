"""A Slurm job as the tests see it: sbatch's result, `scontrol show job -o` fields, the job's output."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


def parse_scontrol_oneliner(text: str) -> dict[str, str]:
    """Parse ``scontrol show ... -o`` output (Key=Value pairs, values may contain spaces
    only in a few known fields; we split on ' Key=' boundaries)."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|\s*$)", text.strip()):
        out.setdefault(m.group(1), m.group(2))
    return out


@dataclass
class JobResult:
    job_id: int
    returncode: int | None  # sbatch --wait exit status (None when not waited)
    info: dict[str, str] = field(default_factory=dict)  # scontrol show job -o at the end
    stdout: str = ""  # sbatch's own output
    stderr: str = ""
    output_path: Path | None = None  # the job's --output file
    run_dir: Path | None = None  # launch(): the run directory the sbatch script uses

    @property
    def state(self) -> str:
        return self.info.get("JobState", "?")

    @property
    def exit_code(self) -> int | None:
        """The job's ExitCode as a shell status (code, or 128+signal)."""
        ec = self.info.get("ExitCode")
        if not ec:
            return None
        code, _, sig = ec.partition(":")
        return int(code) if int(code) or not int(sig or 0) else 128 + int(sig)

    @property
    def restarts(self) -> int:
        return int(self.info.get("Restarts", "0") or 0)

    def output(self) -> str:
        if self.output_path is None:
            return ""
        try:
            return self.output_path.read_text(errors="replace")
        except OSError:
            return ""
