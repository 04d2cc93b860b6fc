#!/usr/bin/env bash
# The CIFAR-10 / LeNet reproduction: scripts/reproduce.sh with DATASET=cifar10 (its usage applies).
DATASET=cifar10 exec bash "$(dirname "$0")/reproduce.sh" "$@"
