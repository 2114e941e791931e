#!/usr/bin/env bash
# The whole test suite, as the README runs it: install this checkout (with test extras) if needed, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# the Slurm tests start a private cluster from Debian's packages: install them when missing (root, as in CI)
SLURM_PACKAGES="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "tests/run.sh: the Slurm tests need: apt-get install $SLURM_PACKAGES (run as root, or install them first)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SLURM_PACKAGES >/dev/null
fi
# the dashboard tests start a PostgreSQL cluster and drive a headless Chromium, both from Debian's packages
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v chromium >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "tests/run.sh: the dashboard tests need: apt-get install postgresql chromium (run as root, or install them first)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql chromium >/dev/null
fi
python -m pip install -q -e ".[test]"
# hundreds of Python processes import this checkout during the suite: with PYTHONDONTWRITEBYTECODE set (some images and
# CI shells set it) each one compiled the package again, and each worker re-did pytest's assertion rewriting
unset PYTHONDONTWRITEBYTECODE
# lint and format are part of the suite: a finding fails the run (and CI) before any test starts
python -m ruff check --quiet .
python -m ruff format --check --quiet .
# three workers on two cores: much of the suite waits on real time (leases, Slurm, signals, servers); each worker runs
# one test file at a time, the longest first (tests/conftest.py); -n 0 runs it serially
python -m pytest -q -n 3 --dist loadgroup --no-loadscope-reorder --durations=15 "$@"
