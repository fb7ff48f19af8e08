#!/usr/bin/env bash
# Mutation testing of the core modules on the fast loop (mutmut; configuration in pyproject.toml
# [tool.mutmut], method and scores in docs/testing.md).
#
#   scripts/mutation.sh                         every core module
#   scripts/mutation.sh clsvit/checkpoint.py    one module (or several)
#   scripts/mutation.sh --summary [MODULE...]   the scores of the last runs, without running
#   scripts/mutation.sh --survivors [MODULE...] run again the mutants that survived (less the listed
#                                               equivalents) or were not checked
#
# Each mutant runs only the fast tests (-m "not slow") that reach the function it changes. The first
# run records which tests reach which function (one pass of the fast loop, cached in mutants/);
# later runs test only the mutants of functions that changed (a survivor of an unchanged function
# keeps its result until --survivors runs it again with the tests as they are now), after mapping again
# the tests of the test files changed since. It ends with killed/total per
# module and the survivors (inspect one: .venv/bin/mutmut show NAME). MUTATION_JOBS (default 2) sets
# the parallel test processes; everything runs under `nice -n 10`.
set -euo pipefail
cd "$(dirname "$0")/.."

run=1 survivors=0
if [ "${1:-}" = "--summary" ]; then run=0; shift; fi
if [ "${1:-}" = "--survivors" ]; then survivors=1; shift; fi

patterns=()
for module in "$@"; do
  [ -f "$module" ] || { echo "mutation.sh: no such module: $module" >&2; exit 2; }
  grep -q "\"$module\"" pyproject.toml || { echo "mutation.sh: $module is not in [tool.mutmut] only_mutate (pyproject.toml)" >&2; exit 2; }
  name=${module%.py}
  patterns+=("${name//\//.}.*")
done

# mutmut's results for the modules given: "names" lists the mutants whose tests passed (survivors,
# "no tests", not yet run) less the survivors listed in tests/mutation_equivalents.md; "summary"
# prints killed/total per module, the score without the listed ones, and the unlisted survivors
results() {
  .venv/bin/mutmut results --all true 2>/dev/null | .venv/bin/python -c '
import collections, fnmatch, re, sys
mode, patterns = sys.argv[1], sys.argv[2:] or ["*"]
# the tests did not pass: they failed, hung (timeout), or their process died (suspicious: a signal)
DETECTED = ("killed", "timeout", "suspicious", "segfault")
# a row names mutants as `clsvit.m.x_f__mutmut_3`, `_5`: the short ones share the last full name
listed = set()
for row in re.findall(r"^\| (.*?) \|", open("tests/mutation_equivalents.md").read(), re.M):
    for token in re.findall(r"`(clsvit\.[^`]+|_\d+)`", row):
        listed.add(token if token.startswith("clsvit.") else last.rsplit("_", 1)[0] + token)
        last = token if token.startswith("clsvit.") else last
counts, survivors = collections.defaultdict(collections.Counter), collections.defaultdict(list)
contested = []
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    if not name or not any(fnmatch.fnmatch(name, p) for p in patterns):
        continue
    if name in listed:  # counted as listed whatever its status
        if status in DETECTED:  # its tests failed: a crash of the test process, or a wrong row
            contested.append(f"{name} ({status})")
        status = "listed"
    if mode == "names":
        if status not in DETECTED + ("listed",):
            print(name)
        continue
    module = re.split(r"\.x(?:_|\u01c1)", name, maxsplit=1)[0]  # clsvit.runlock.x_f__mutmut_3 -> clsvit.runlock
    counts[module][status] += 1
    if status not in DETECTED + ("listed",):
        survivors[module].append(f"{name} ({status})")
for module in sorted(counts):
    c = counts[module]
    total, killed = sum(c.values()), sum(c[s] for s in DETECTED)
    rest = ", ".join(f"{n} {s}" for s, n in sorted(c.items()) if s not in DETECTED)
    rest = "  (" + rest + ")" if rest else ""
    scored = total - c["listed"]
    print(f"{module:36s} {killed:4d}/{total:<4d} killed, score {killed}/{scored} ({100 * killed / max(scored, 1):5.1f} %){rest}")
for module in sorted(survivors):
    for name in survivors[module]:
        print("  " + name)
for name in contested:
    print(f"  listed, yet its tests did not pass (run it by hand, then fix the row or the test): {name}")
' "$@"
}

run_args=("${patterns[@]}")
if [ "$survivors" = 1 ]; then
  # mutmut runs a mutant named on its command line again even when it has a result
  mapfile -t run_args < <(results names "${patterns[@]}")
  echo "mutation.sh: running ${#run_args[@]} surviving or unchecked mutants again"
  [ "${#run_args[@]}" -gt 0 ] || exit 0
fi

if [ "$run" = 1 ]; then
  start=$SECONDS
  # mutmut maps tests to functions once, and again only for tests it has not seen: a test edited since
  # keeps its old map (an assertion added to it never runs against the functions it now reaches).
  # Forget the tests of every test file changed since the map was written, so mutmut maps them again.
  if [ -f mutants/mutmut-stats.json ]; then
    .venv/bin/python - <<'PY'
import json, os, pathlib
path = pathlib.Path("mutants/mutmut-stats.json")
stats, written = json.loads(path.read_text()), path.stat().st_mtime
changed = {str(f) for f in pathlib.Path("tests").glob("**/test_*.py") if f.stat().st_mtime > written}
if changed:
    edited = lambda test: test.split("::")[0] in changed
    stats["duration_by_test"] = {t: d for t, d in stats["duration_by_test"].items() if not edited(t)}
    stats["tests_by_mangled_function_name"] = {
        f: [t for t in tests if not edited(t)] for f, tests in stats["tests_by_mangled_function_name"].items()}
    path.write_text(json.dumps(stats))
    print(f"mutation.sh: mapping the tests of {len(changed)} changed test files again: {' '.join(sorted(changed))}")
PY
  fi
  # mutmut's exit status says nothing about the score; the summary below does
  mkdir -p mutants
  nice -n 10 .venv/bin/mutmut run --max-children "${MUTATION_JOBS:-2}" "${run_args[@]}" > mutants/mutation.log 2>&1 || true
  tr "\r" "\n" < mutants/mutation.log | grep -v "^[^ -~]" | tail -n 5
  echo "mutation.sh: ran in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
fi

results summary "${patterns[@]}"
