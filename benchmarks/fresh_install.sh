#!/usr/bin/env bash
# A fresh install as a new user gets it today: a fresh clone of this checkout's HEAD, a new venv, the newest
# releases that pyproject.toml's bounds allow (NO constraints file), then the README's test command.
# Run it now and then: a failure here and a pass of `.ci/run` (which installs with constraints.txt) means a
# new upstream release broke us, and `pip list` below says which.
#
#   bash benchmarks/fresh_install.sh                      # install + the whole suite, prints the times
#   bash benchmarks/fresh_install.sh --freeze FILE        # also write the venv's versions to FILE
#                                                         # (how constraints.txt is made: see docs/results.md)
#   PYTEST_ARGS="-q tests/test_serve_schema.py" bash benchmarks/fresh_install.sh   # a part of the suite
#
# Needs: git, python3 with venv, the package registries. Leaves nothing behind but FILE (the temporary
# folder is removed at the end; KEEP=1 keeps it).
set -euo pipefail
freeze=""
if [ "${1:-}" = "--freeze" ]; then freeze="$(realpath -m "${2:?--freeze needs a file}")"; fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d -t anymc3d-fresh-XXXXXX)"
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$work"' EXIT; fi
echo "fresh_install: clone of $(git -C "$repo" rev-parse --short HEAD) in $work"
git clone -q "$repo" "$work/anymc3d"
cd "$work/anymc3d"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
t0=$(date +%s)
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -e ".[test]"      # the README's command, without -c constraints.txt
t1=$(date +%s)
echo "fresh_install: install took $((t1 - t0)) s"
"$py" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|timm|peft|monai|numpy|nibabel|simpleitk|pydicom|pytest|hypothesis|schemathesis|fastapi|starlette|uvicorn|httpx|playwright|python-multipart) ' || true
if [ -n "$freeze" ]; then
  { echo "# pip freeze of a passing fresh install (benchmarks/fresh_install.sh --freeze), $(date -u +%Y-%m-%d), $("$py" --version), $(uname -m)"
    echo "# use: pip install -c constraints.txt -e \".[test]\"   (the versions CI tests with)"
    "$py" -m pip freeze --exclude-editable | grep -viE '^(anymc3d|pip|setuptools|wheel)==' ; } > "$freeze.tmp"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
set +e
# shellcheck disable=SC2086
"$py" -m pytest ${PYTEST_ARGS:--q}
rc=$?
set -e
t2=$(date +%s)
echo "fresh_install: tests took $((t2 - t1)) s, exit code $rc"
if [ -n "$freeze" ]; then
  if [ "$rc" = 0 ]; then mv "$freeze.tmp" "$freeze"; echo "fresh_install: wrote $freeze"
  else rm -f "$freeze.tmp"; echo "fresh_install: tests failed, $freeze not written" >&2; fi
fi
exit "$rc"
