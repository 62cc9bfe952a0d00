#!/usr/bin/env bash
# Reproduce results/capacity_probe_30ep: the capacity probe at half the length (270 steps).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../capacity_probe/run.sh" capacity_probe_30ep
