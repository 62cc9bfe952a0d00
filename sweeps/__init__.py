"""Sweep definitions (YAML) and their launcher: model size x mask ratio x V1/V2 on Slurm."""
