"""The machine a result was computed on: CPU, torch build, the CPU kernels torch chose, accelerator.

Floating-point results depend on it. torch picks its CPU kernels by the instruction set it
finds (AVX2, AVX-512), and the rounding of a matrix product differs between them, so a long
training run drifts apart: the same commit and config gave the default study's SFT NDCG@10
0.0511 on the Intel Xeon machines of earlier runs and 0.0529 on an AMD EPYC (AVX2 only),
while SASRec's came out identical. Runs on one kind of machine reproduce to the last digit.

So every stage records `describe()`: as MLflow tags (`machine.*`), in a model folder's
rere.json (`machine`: where it was trained), and in metrics.json (`machine`: where it was
evaluated; `trained_on`: the model's). The report names the machines it read.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping

CPUINFO = "/proc/cpuinfo"


def cpu_name() -> str:
    """The CPU's model name (CPUINFO on Linux), else what `platform` says, else "unknown"."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe() -> dict[str, str]:
    """The machine and, when this process has imported torch (every stage that computes with it
    has; `rere data` and `rere index` need not), torch's version, CPU kernel level and GPU."""
    out = {"cpu": cpu_name(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = str(torch.__version__)
        out["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
        out["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return out


def summary(machine: Mapping | None) -> str:
    """One line for a report.

    >>> summary({"cpu": "AMD EPYC", "python": "3.11.7", "torch": "2.13.0+cpu", "cpu_capability": "AVX2",
    ...          "accelerator": "none"})
    'AMD EPYC, torch 2.13.0+cpu (AVX2 CPU kernels), no GPU'
    >>> summary({"cpu": "Intel Xeon", "python": "3.11.7"}), summary(None)
    ('Intel Xeon', 'not recorded')
    """
    if not machine:
        return "not recorded"
    text = str(machine.get("cpu", "unknown CPU"))
    if "torch" in machine:
        text += f", torch {machine['torch']} ({machine.get('cpu_capability', '?')} CPU kernels)"
    accelerator = machine.get("accelerator")
    if accelerator:
        text += ", no GPU" if accelerator == "none" else f", GPU {accelerator}"
    return text
