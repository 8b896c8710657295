#!/usr/bin/env bash
# Mutation score of the method's core (docs/testing.md): mutmut mutates the modules that pyproject.toml's
# [tool.mutmut] names and runs, for each mutant, the selected tests that reach the mutated function.
#
#   scripts/mutation.sh [TESTS_COMMIT [PYTEST_ARG ...]]
#
# Runs in a throwaway worktree of HEAD, so the checkout is left alone. With TESTS_COMMIT, the tests/ folder comes
# from that commit instead; PYTEST_ARGs (such as --deselect=tests/x.py::test_y, for an old test that no longer fits
# the code) are added to the test selection. The summary, every mutant's status and the survivors' diffs go to
# runs/mutation-<tests commit>/. Several hours on a 2-core CPU (docs/testing.md).
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
tests_from=$(git -C "$repo" rev-parse --short "${1:-HEAD}")
shift || true
out="$repo/runs/mutation-$tests_from"
work=$(mktemp -d)
git -C "$repo" worktree add --detach -q "$work/tree" HEAD
trap 'git -C "$repo" worktree remove --force "$work/tree"; rm -rf "$work"' EXIT
cd "$work/tree"
if [ "$tests_from" != "$(git rev-parse --short HEAD)" ]; then
    rm -rf tests && git checkout "$tests_from" -- tests
fi
"$repo/.venv/bin/python" - "$@" <<'PY'
# Add the PYTEST_ARGs to the test selection and drop the test files this tests/ folder does not have.
import re
import sys
from pathlib import Path

path = Path("pyproject.toml")
text = path.read_text()
start = text.index("pytest_add_cli_args_test_selection = [")
end = text.index("]\n", start)
entries = [line for line in text[start:end].splitlines()[1:] if line.strip()]
kept = [line for line in entries if not (m := re.match(r'\s*"(?:--deselect=)?(tests/[^":]+)', line)) or Path(m[1]).exists()]
kept += [f'    "{arg}",' for arg in sys.argv[1:]]
path.write_text(text[:start] + "pytest_add_cli_args_test_selection = [\n" + "\n".join(kept) + "\n" + text[end:])
PY
"$repo/.venv/bin/pip" install -q -r "$repo/requirements-mutation.txt"
mutmut="$repo/.venv/bin/mutmut"
"$mutmut" run --max-children "$(nproc)" > mutmut.log 2>&1 || { tail -c 3000 mutmut.log; exit 1; }
mkdir -p "$out"
"$mutmut" results --all true > "$out/results.txt"
grep -E ': survived$' "$out/results.txt" | sed 's/: survived$//; s/^ *//' | while read -r name; do
    "$mutmut" show "$name"
done > "$out/survivors.diff"
sed 's/^ *//; s/\.x_\?[^.]*__mutmut_[0-9]*:/:/' "$out/results.txt" | sort | uniq -c | tee "$out/summary.txt"
echo "results in $out"
