#!/usr/bin/env bash
# Reproduce results/atto_v1_v2_seed1: the atto V1/V2 pair of atto_v1_v2 with seed 1.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../atto_v1_v2/run.sh" 1
