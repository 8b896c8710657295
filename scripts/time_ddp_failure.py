"""How fast a torchrun job ends when one process raises: seconds from that process's error line to the job's end.

    python scripts/time_ddp_failure.py --trials 3

Two gloo processes train the demo network, shrunk, on a tiny generated image folder (tests/conftest.py);
tests/ddp_fault.py makes rank 1 raise at its 5th training step, without restarts. Prints JSON: each trial's
seconds, exit status and error lines (there should be one, rank 1's).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import write_folder  # noqa: E402

SETTINGS = ["train.epochs_per_block=3", "train.batch_size=12", "train.train_eval_size=8", "train.device=cpu",
            "data.val_size=9", "model.widths=[8,8,16]", "model.downsample_at=[2]", "model.k=2"]  # fmt: skip


def trial(data: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "ddp_fault.py"), "train", "--out", str(out), "--data", str(data),
               *(arg for s in SETTINGS for arg in ("--set", s))]  # fmt: skip
    job = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
                           env={**os.environ, "FAIL_AT_STEP": "5"})  # fmt: skip
    errors, seen = [], None
    for line in job.stderr:
        if line.startswith("error: "):
            seen = seen or time.monotonic()
            errors.append(line.strip())
    job.wait()
    return {"seconds": round(time.monotonic() - seen, 2) if seen else None, "exit": job.returncode, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_folder(Path(tmp) / "data", per_class=16)
        trials = [trial(data, Path(tmp) / f"run{i}") for i in range(args.trials)]
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "trials": trials}, indent=2))


if __name__ == "__main__":
    main()
