"""How many probe rows the SDM simulation needs to rank the junk domain last: its simulation alone, over seeds.

The simulation of benchmarks/sdm_mix.py (its data, proxy, target and K=4 checkpoints), run for each seed and each
number of probe rows (training rows per domain and checkpoint, whose gradient is aligned with the target's).
The junk domain is prose with its tokens shuffled; its source, prose, is also of little use to a reasoning target,
so the two sit close together at the bottom, and a noisy gradient estimate puts either last. Reported per run:
each domain's aggregated utility, the weights, which domain ranks last, and the simulation's seconds.

    python benchmarks/sdm_probe_rows.py                     # rows 4 and 8, seeds 0-4: about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilellm.artifacts import fetch_smollm2  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_json  # noqa: E402
from sdm_mix import JUNK_SOURCE, experiment_shards, run_simulation  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sdm_probe_rows.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--proxy-steps", type=int, default=64)
    parser.add_argument("--target-rows", type=int, default=4)
    args = parser.parse_args()
    shards = experiment_shards(fetch_smollm2())
    junk = f"shuffled-{JUNK_SOURCE}"
    runs = []
    with tempfile.TemporaryDirectory(prefix="sdm-probe-rows-") as work:
        for rows in args.rows:
            for seed in args.seeds:
                torch.manual_seed(seed)
                start = time.perf_counter()
                mix = run_simulation(shards, Path(work) / f"rows{rows}-seed{seed}", seed=seed,
                                     proxy_steps=args.proxy_steps, proxy_batch=2, seq_len=128, probe_rows=rows,
                                     target_rows=args.target_rows)
                utilities = mix["utilities"]
                last = min(utilities, key=utilities.get)
                runs.append({"rows": rows, "seed": seed, "last": last, "utilities": utilities,
                             "weights": mix["weights"], "seconds": time.perf_counter() - start})
                print(f"rows {rows} seed {seed}: last {last}; junk {utilities[junk]:+.3f}, "
                      f"{JUNK_SOURCE} {utilities[JUNK_SOURCE]:+.3f}", flush=True)
    summary = {str(rows): f"junk last in {sum(r['last'] == junk for r in runs if r['rows'] == rows)} of "
               f"{len(args.seeds)} seeds" for rows in args.rows}
    print(summary)
    write_json(RESULTS, {"command": "python benchmarks/sdm_probe_rows.py " + " ".join(sys.argv[1:]),
                         "machine": machine_info("2-core CPU, alone"), "junk": junk, "summary": summary,
                         "runs": runs})


if __name__ == "__main__":
    main()
