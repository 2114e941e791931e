#!/usr/bin/env bash
# The whole test suite, as the README runs it: install this checkout (with test extras) if needed, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m pytest -q "$@"
