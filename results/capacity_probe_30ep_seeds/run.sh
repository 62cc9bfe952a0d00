#!/usr/bin/env bash
# Reproduce results/capacity_probe_30ep_seeds: atto and pico at 270 steps with three seeds each.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../capacity_probe/run.sh" capacity_probe_30ep_seeds
