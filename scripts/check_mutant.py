"""Apply one mutant by hand, run the given tests on it, put the file back.

    python scripts/check_mutant.py FILE OLD NEW -- PYTEST_ARGS...

For survivors of scripts/mutation.sh that only tests outside its selection can notice (the multi-process and GPU
tests): docs/testing.md lists the ones checked this way. OLD must occur exactly once in FILE. Prints "killed"
(a test failed) or "survived" and exits 0; exits 2 when OLD is not there once or pytest did not run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path, old, new = Path(argv[0]), argv[1], argv[2]
    original = path.read_text()
    if original.count(old) != 1:
        print(f"{old!r} occurs {original.count(old)} times in {path}, not once", file=sys.stderr)
        return 2
    path.write_text(original.replace(old, new))
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *argv[4:]], capture_output=True)
    finally:
        path.write_text(original)
    if result.returncode not in (0, 1):  # 1: a test failed or errored; anything else: pytest itself did not run
        print(f"pytest exited {result.returncode}: {result.stdout.decode()[-300:]}", file=sys.stderr)
        return 2
    print("killed" if result.returncode == 1 else "survived")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
