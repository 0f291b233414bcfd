#!/usr/bin/env bash
# Train on N nodes x G processes with torchrun. Run it once on every node, same arguments, with
# that node's NODE_RANK; the arguments after the script go to `python -m drdo_lightning fit`.
#
#   # node 0 (its address: node0)                    # node 1
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 \         NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 \
#     launch/torchrun_drdo.sh \                        launch/torchrun_drdo.sh \
#     --config configs/drdo.yaml \                     --config configs/drdo.yaml \
#     --config configs/strategies/deepspeed_zero2.yaml --trainer.precision bf16-mixed   (same on both)
#
# NPROC_PER_NODE defaults to the node's GPU count (1 on a CPU-only node: add --trainer.accelerator cpu).
# The run resumes from the last checkpoint when there is one (--ckpt_path last), so after a crash or
# a time limit, launching the same command again continues it.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}
PYTHON=${PYTHON:-python}

# Lightning must know the layout torchrun creates; it comes last so no config file overrides it.
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m drdo_lightning fit --ckpt_path last "$@" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE"
