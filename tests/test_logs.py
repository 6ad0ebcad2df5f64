"""Library warnings reach the commands' log once, in its format (dylora_moe.logs)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_hub_warning_prints_once():
    code = (
        "import logging; logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')\n"
        "from dylora_moe.logs import one_line_per_record; one_line_per_record()\n"
        "from huggingface_hub.utils import logging as hub; hub.get_logger('huggingface_hub.utils._http')"
        ".warning('Retrying in 1s [Retry 1/5].')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["WARNING huggingface_hub.utils._http: Retrying in 1s [Retry 1/5]."]


def test_the_bitsandbytes_hub_kernel_notice_is_dropped_and_other_records_kept():
    code = (
        "import logging; logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')\n"
        "from dylora_moe.logs import one_line_per_record; one_line_per_record()\n"
        "import peft\n"  # imports bitsandbytes where it is installed: its notice would print here
        "for name in ('bitsandbytes.backends.cpu.ops', 'kernels._internals.hf_hub'):\n"
        "    logging.getLogger(name).warning('Failed to load CPU gemm_4bit_forward from "
        "kernels-community/quantization-bitsandbytes: offline')\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["WARNING bitsandbytes.backends.cpu.ops: another warning"]
