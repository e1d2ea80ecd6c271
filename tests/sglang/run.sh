#!/usr/bin/env bash
# Runs SGLang 0.5.23's own diffusion test test_update_weights_from_disk.py, unchanged, against `refit serve`
# on the CPU: tiny refit-made checkpoints under the test's Hugging Face ids in a private, offline hub cache,
# and an `sglang` launcher (bin/sglang) that starts refit. Exits with pytest's status.
#   REFIT_BIN=build/apps/refit tests/sglang/run.sh [pytest args]
# The test and the packages it imports are installed by scripts/setup into .deps-py/sglang (SGLANG_SITE).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
site="${SGLANG_SITE:-$here/../../.deps-py/sglang}"
test_rel="sglang/multimodal_gen/test/single_test_file/test_update_weights_from_disk.py"
py="${PYTHON:-python3}"
[ -x "${REFIT_BIN:-}" ] || { echo "run.sh: REFIT_BIN must name the refit binary" >&2; exit 2; }
[ -f "$site/$test_rel" ] || { echo "run.sh: SGLang's test is not installed in $site: run scripts/setup" >&2; exit 2; }
work="$(mktemp -d -t refit-sglang-XXXXXX)"
trap 'rm -rf "$work"' EXIT
export HF_HOME="$work/hf_home" HF_HUB_OFFLINE=1
"$py" "$here/make_fake_hf_cache.py" --refit-bin "$REFIT_BIN" --hf-home "$HF_HOME" >&2
export PATH="$here/bin:$PATH" PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" REFIT_BIN
export CUDA_VISIBLE_DEVICES="" SGLANG_IS_IN_CI=true SGLANG_TEST_WAIT_SECS="${SGLANG_TEST_WAIT_SECS:-120}"
export SGLANG_PERF_LOG_DIR="$work/perf_logs"
cd "$work"
exec "$py" -m pytest -v -p no:cacheprovider "$site/$test_rel" "$@"
