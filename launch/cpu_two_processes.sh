#!/usr/bin/env bash
# Two CPU processes that really all-reduce (gloo), for checking distributed code paths without a GPU.
#   bash launch/cpu_two_processes.sh --corpus shapeworld-16 train.steps=20
ACCELERATE_USE_CPU=1 exec accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no train.py "$@"
